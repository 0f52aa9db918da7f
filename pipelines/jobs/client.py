"""`backend_for(where)`: the job backend its caller chose, "local" or "cluster".

The factory sits with the callers (the train step, `arrcoc pytorchjob run`, the local sweep), as kubeflow/sdk's
TrainerClient picks its backend (kubeflow/trainer/api/trainer_client.py, TrainerClient.__init__): this is the one
module that imports both backends, and no backend imports it.
"""
from __future__ import annotations

from pipelines.jobs.backends import BACKENDS, BackendError, ClusterOptions, JobBackend


def backend_for(where: str, cluster: ClusterOptions | None = None, *, containers: bool = False) -> JobBackend:
    """containers: locally, each replica as a podman container of the manifest's image (ignored on a cluster)."""
    if where == "local":
        from pipelines.jobs.local import LocalBackend

        return LocalBackend(containers=containers)
    if where == "cluster":
        from pipelines.jobs.cluster import ClusterBackend  # kubeflow-training and the kubernetes client: only here

        return ClusterBackend(cluster or ClusterOptions())
    raise BackendError(f"backend={where!r} is not one of {', '.join(BACKENDS)}")
