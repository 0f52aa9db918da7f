"""Katib's rewrite of a trial's primary container (pipelines/sweeps/collector.py), compared with the strings Katib's
own tests expect (kubeflow/katib v0.19.0 pkg/webhook/v1beta1/pod/inject_webhook_test.go TestWrapWorkerContainer),
and run with sh after the kubelet's expansion."""
from __future__ import annotations

import subprocess
import sys

import pytest

from pipelines.sweeps.collector import CollectorError, kubelet_expand, wrap_primary_container


@pytest.mark.parametrize("container, early_stopping, expected", [
    # "Tensorflow container without sh -c"
    ({"name": "tensorflow", "command": ["python", "main.py"]}, False,
     "python main.py 1>metric.log 2>&1 && echo completed > $$$$.pid"),
    # "Tensorflow container with sh -c"
    ({"name": "tensorflow", "command": ["sh", "-c", "python main.py"]}, False,
     "python main.py 1>metric.log 2>&1 && echo completed > $$$$.pid"),
    # "Training job with early stopping"
    ({"name": "tensorflow", "command": ["python", "main.py"]}, True,
     "python main.py 1>metric.log 2>&1 || if test -f $$$$.pid && [ $(head -n 1 $$.pid) = early-stopped ]; then "
     "echo Training Container was Early Stopped; else echo Training Container was Failed; exit 1; fi "
     "&& echo completed > $$$$.pid"),
])
def test_the_wrap_is_katibs(container, early_stopping, expected):
    wrapped = wrap_primary_container(container, early_stopping=early_stopping, metrics_path="metric.log")
    assert wrapped["command"] == ["sh", "-c"]
    assert wrapped["args"] == [expected]


def test_args_follow_the_command_and_the_default_file_is_katibs():
    wrapped = wrap_primary_container({"name": "pytorch", "command": ["torchrun", "-m", "trainer"],
                                      "args": ["--steps", "3"]})
    assert wrapped["args"] == ["torchrun -m trainer --steps 3 1>/var/log/katib/metrics.log 2>&1 "
                               "&& echo completed > /var/log/katib/$$$$.pid"]


def test_other_collectors_leave_the_container_alone_and_a_missing_command_is_named():
    container = {"name": "pytorch", "command": ["python"], "args": ["-m", "trainer"]}
    assert wrap_primary_container(container, collector="Push") == container
    with pytest.raises(CollectorError, match="'pytorch' has no command"):
        wrap_primary_container({"name": "pytorch", "args": ["-m", "trainer"]})


@pytest.mark.parametrize("text, env, expected", [
    ("$$$$.pid", {}, "$$.pid"),  # what the shell gets for Katib's pid file
    ("$$.pid", {}, "$.pid"),
    ("--out=$(RUN)/x", {"RUN": "r1"}, "--out=r1/x"),
    ("$(UNSET) $(RUN", {"RUN": "r1"}, "$(UNSET) $(RUN"),  # unknown and unterminated references stay
    ("a$b$", {}, "a$b$"),
    ("$$(RUN)", {"RUN": "r1"}, "$(RUN)"),  # escaped reference
    ("[ $(head -n 1 $$.pid) ]", {}, "[ $(head -n 1 $$.pid) ]"),  # read as an unset variable: left whole
])
def test_kubelet_expansion(text, env, expected):
    assert kubelet_expand(text, env) == expected


def _run_wrapped(tmp_path, script: str, *, early_stopping: bool) -> tuple[subprocess.CompletedProcess, str]:
    train = tmp_path / "train.py"
    train.write_text(script)
    wrapped = wrap_primary_container({"name": "pytorch", "command": [sys.executable, str(train)]},
                                     early_stopping=early_stopping, metrics_path=str(tmp_path / "metrics.log"))
    argv = [kubelet_expand(a, {}) for a in wrapped["command"] + wrapped["args"]]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60), (tmp_path / "metrics.log").read_text()


def test_a_finished_trial_leaves_its_metrics_and_the_completed_mark_under_the_shells_pid(tmp_path):
    result, metrics = _run_wrapped(tmp_path, "print('relevance_score=0.5')\n", early_stopping=False)
    assert result.returncode == 0
    assert metrics == "relevance_score=0.5\n"
    (mark,) = tmp_path.glob("*.pid")
    assert mark.stem.isdigit() and mark.read_text() == "completed\n"


def test_a_failed_trial_exits_with_its_code_and_leaves_no_mark(tmp_path):
    result, _ = _run_wrapped(tmp_path, "raise SystemExit(3)\n", early_stopping=False)
    assert result.returncode == 3
    assert not list(tmp_path.glob("*.pid"))


def test_an_early_stopped_trial_as_the_kubelet_runs_it(tmp_path):
    """The metrics collector writes `early-stopped` to <main pid>.pid and kills the trainer
    (cmd/metricscollector/v1beta1/file-metricscollector/main.go watchMetricsFile). The wrapper's test reads that
    file (the kubelet leaves `$(head -n 1 $$.pid)` alone), so the container exits 0, and the `&& echo completed`
    that follows the `||` group then overwrites the mark."""
    script = (f"import os\nopen(os.path.join({str(tmp_path)!r}, f'{{os.getppid()}}.pid'), 'w').write('early-stopped')\n"
              "raise SystemExit(1)\n")
    result, _ = _run_wrapped(tmp_path, script, early_stopping=True)
    assert result.stdout == "Training Container was Early Stopped\n"
    assert result.returncode == 0
    assert [p.read_text() for p in tmp_path.glob("*.pid")] == ["completed\n"]


def test_a_failed_trial_under_early_stopping_still_fails(tmp_path):
    result, _ = _run_wrapped(tmp_path, "raise SystemExit(3)\n", early_stopping=True)
    assert result.stdout == "Training Container was Failed\n"
    assert result.returncode == 1
    assert not list(tmp_path.glob("*.pid"))
