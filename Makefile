# The two set-up commands are `make demo` and `make test`; both create the virtual environment on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test test-all bench bench-gpu lint compile validate crds clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the local CPU wheel. Anything unpinned would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/arrcoc demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

# The trainer's step on every GPU of this node (torchrun, one process per GPU); on a machine without one, a
# few tiny CPU steps that say they are not GPU figures. Extra flags: make bench-gpu ARGS="--precision fp32".
GPUS = $(shell nvidia-smi -L 2>/dev/null | wc -l)
bench-gpu: $(STAMP)
	if [ "$(GPUS)" -gt 1 ]; then $(BIN)/python -m torch.distributed.run --nproc-per-node $(GPUS) bench/gpu_step.py $(ARGS); \
	else $(BIN)/python bench/gpu_step.py $(ARGS); fi

clean:
	rm -rf $(VENV) runs .pytest_cache

validate: $(STAMP)
	$(BIN)/arrcoc validate

crds: $(STAMP)
	$(BIN)/python -m pipelines.crds download

compile: $(STAMP)
	$(BIN)/arrcoc compile
