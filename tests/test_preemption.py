"""The preemption drill end to end with the real trainer: a 2-replica job whose replica is killed mid-run recovers
through the local runner's ExitCode restarts and ends with the same metrics as an uninterrupted run.
(The runner's own restart rules are tested with tiny commands in test_local_runner.py.)"""
from __future__ import annotations

import json
import signal

import pytest

from pipelines.jobs.local import Chaos, run_local
from pipelines.jobs.pytorchjob import build_pytorchjob, to_manifest
from pipelines.jobs.team_config import TeamConfig

ARGS = ["--steps", "16", "--batch-size", "8", "--eval-every", "8", "--eval-size", "32", "--checkpoint-every", "4",
        "--log-every", "1", "--seed", "3"]


def job() -> dict:
    return to_manifest(build_pytorchjob("preempt", team=TeamConfig.local_default(), trainer_args=ARGS, workers=1,
                                        nproc_per_node="1", env={"OMP_NUM_THREADS": "1"}))


def final_metrics(workdir) -> dict:
    (path,) = workdir.rglob("metrics.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = run_local(job(), workdir, timeout=600, log_stream=None)
    assert result.succeeded, result.final
    return final_metrics(workdir)


@pytest.mark.parametrize("replica, sig, rank", [("worker-0", signal.SIGKILL, 1), ("master-0", signal.SIGTERM, 0)])
def test_killed_replica_recovers_with_identical_metrics(tmp_path, uninterrupted, replica, sig, rank):
    chaos = Chaos(replica=replica, signal=sig, log_pattern=rf"^\[rank {rank}\] step 10/")
    result = run_local(job(), tmp_path, timeout=600, log_stream=None, chaos=[chaos])
    assert result.succeeded, result.final
    assert result.chaos and result.chaos[0].replica == replica
    assert max(result.restarts.values()) == 1
    assert 128 + sig in result.exit_codes[replica]
    log = result.master_log.read_text()
    resumed = int(log.split("at step ")[-1].split()[0]) if "resumed from" in log else None
    if sig == signal.SIGTERM:
        assert resumed is not None and resumed >= 10  # checkpoint on signal: no completed step lost
    else:
        assert resumed is not None and 10 - resumed <= 4  # at most one checkpoint interval
    assert final_metrics(tmp_path) == uninterrupted
