"""Where a PyTorchJob runs: the backend interface, its result and its failure. The backends live in
pipelines/jobs/local.py (replicas as processes, the operator's env contract and restart rules) and
pipelines/jobs/cluster.py (kubeflow-training's TrainingClient); callers pick one with pipelines/jobs/client.py's
backend_for, as kubeflow/sdk separates backends/base.py, the backends and the client (docs/pytorchjob.md).
"""
from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from trainer.errors import UserError

BACKENDS = ("cluster", "local")


class BackendError(UserError):
    """A bad backend choice or option: one line, exit code 2."""


@dataclass
class JobResult:
    name: str
    namespace: str
    succeeded: bool
    conditions: list[dict[str, str]]  # as status.conditions: type, status, reason, message
    master_log: Path  # a file holding the master's log (every attempt, in order)
    seconds: float = 0.0
    deleted: bool = False  # the job object was removed afterwards (cluster; local jobs leave nothing)
    logs_dir: Path | None = None  # every replica's log, where the backend keeps them

    @property
    def failure(self) -> dict[str, str]:
        """The last Failed condition (reason, message), or {}."""
        return next((c for c in reversed(self.conditions) if c.get("type") == "Failed"
                     and str(c.get("status")) == "True"), {})


class JobFailed(UserError):
    """The job did not succeed: one line naming the job, the reason and the message."""

    exit_code = 1

    def __init__(self, result: JobResult, hint: str = ""):
        failure = result.failure
        self.result = result
        self.reason = failure.get("reason") or "Failed"
        self.message = failure.get("message") or "no message"
        super().__init__(f"PyTorchJob {result.namespace}/{result.name} failed: {self.reason}: {self.message}"
                         + (f" ({hint})" if hint else ""))


def failed_condition(reason: str, message: str) -> dict[str, str]:
    return {"type": "Failed", "status": "True", "reason": reason, "message": message}


class JobBackend(abc.ABC):
    """Runs PyTorchJob manifests somewhere."""

    where: str

    @abc.abstractmethod
    def run(self, job: Mapping[str, Any] | Any, workdir: Path, *, timeout: float | None = None,
            log_stream: TextIO | None = None) -> JobResult:
        """Run `job` (a manifest dict or a KubeflowOrgV1PyTorchJob) to its end; `workdir` keeps this run's logs
        (and, locally, its volumes). Returns on Succeeded, raises JobFailed otherwise."""

    @abc.abstractmethod
    def volume_dir(self, job: Mapping[str, Any], volume: str, workdir: Path) -> Path:
        """Where this process sees the files the job's replicas see in `volume`, to stage inputs and collect
        outputs; a BackendError when it cannot see them."""


@dataclass
class ClusterOptions:
    """Settings only the cluster has: a local job leaves nothing behind to delete or to poll over the network.
    step_mounts: PVC claim name -> the path where this process has it mounted (a KFP step's mount_pvc)."""

    namespace: str | None = None
    delete: str = "on-success"
    poll_interval: float = 15.0
    step_mounts: Mapping[str, str] = field(default_factory=dict)
