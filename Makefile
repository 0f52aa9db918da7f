# The two set-up commands are `make demo` and `make test`; both create the virtual environment on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test test-all bench bench-gpu lint compile validate crds clean image demo-image test-image

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the local CPU wheel. Anything unpinned would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/arrcoc demo

# ruff first: a lint finding fails the test command before the slower tests run.
lint: $(STAMP)
	$(BIN)/ruff check .

# tests/test_image.py runs the trainer image with podman when podman is here and the image is built from this
# checkout (make image); otherwise pytest lists them as skipped, with the reason, and the line below says so.
TEST_MARKERS ?= not slow
test: lint
	$(BIN)/python -m pytest -q -m "$(TEST_MARKERS)"
	@command -v podman >/dev/null || echo "make test: the image tests were skipped: podman is not installed (make test-image needs it)"

# The trainer image (trainer/Dockerfile) on the project's Debian base, tagged arrcoc-trainer:<version> and as
# the manifests name it; prints its size and build time. Needs podman and debootstrap (Debian packages).
image: $(STAMP)
	$(BIN)/arrcoc image build

# The pipeline with every step in the image (kfp.local.DockerRunner against podman's Docker API).
demo-image: image
	$(BIN)/arrcoc demo --image --workdir runs/demo-image

# The image tests with their own budget (CI gives them 30 minutes): build the image, then run them; a missing or
# stale image fails here instead of skipping.
test-image: image
	ARRCOC_IMAGE_TESTS=required $(BIN)/python -m pytest -q -m image tests/test_image.py

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
	$(BIN)/python -m pipelines.validation.crds download

compile: $(STAMP)
	$(BIN)/arrcoc compile
