"""DeepSpeed ZeRO stage 2 on CPU (gloo), two processes with the operator's env. Slow: DeepSpeed's start-up
costs tens of seconds per process here, so `make test` skips it; `make test-all` runs it."""
from __future__ import annotations

import subprocess

import pytest

from tests.trainer_helpers import FAST, REPO, clean_env, free_port, metric_lines, read_metrics, trainer_cmd


@pytest.mark.slow
def test_zero2_trains_checkpoints_and_resumes(tmp_path):
    out = tmp_path / "ds"
    first = _run(["--strategy", "deepspeed", "--steps", "10", *FAST, "--out", str(out)])
    assert [rc for rc, _, _ in first] == [0, 0], first[0][2][-3000:]
    assert len(metric_lines(first[0][1])) == 4 and metric_lines(first[1][1]) == []
    step_dir = out / "checkpoints" / "step-00000010"
    assert (step_dir / "COMPLETE").is_file() and (step_dir / "deepspeed").is_dir()

    second = _run(["--strategy", "deepspeed", "--steps", "20", *FAST, "--out", str(out)])
    assert [rc for rc, _, _ in second] == [0, 0], second[0][2][-3000:]
    assert "at step 10" in second[0][2]
    assert read_metrics(out)["step"] == 20


def _run(args: list[str]) -> list[tuple[int, str, str]]:
    port = str(free_port())
    procs = [subprocess.Popen(trainer_cmd(*args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(r)))
             for r in (0, 1)]
    results = [p.communicate(timeout=600) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, results)]
