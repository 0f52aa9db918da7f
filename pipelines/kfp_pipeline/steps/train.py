"""The train step's work: stage the datasets on the team's checkpoint volume, run one PyTorchJob (built by
pipelines/jobs/pytorchjob.py) on the cluster or rehearsed here, and collect its adapter. How the data reaches
the replicas, and why through that volume: docs/pipeline.md ("Getting the data to the replicas").
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from pipelines.kfp_pipeline.components import BASE_IMAGE
from trainer.config import TrainConfig
from trainer.errors import UserError
from trainer.files import copy_dir_atomic, write_bytes_atomic, write_text_atomic
from trainer.knobs import PIPELINE_KNOBS, flags

# Locally, a team-config file (the ConfigMap YAML) may stand in for TeamConfig.local_default().
TEAM_CONFIG_FILE_ENV = "ARRCOC_TEAM_CONFIG_FILE"
# The trainer's metrics port (pipelines/jobs/pytorchjob.py); "0" turns the exporter off (`arrcoc demo --no-metrics`).
METRICS_PORT_ENV = "ARRCOC_METRICS_PORT"
MAX_TIMEOUT_MINUTES = 24 * 60  # the train task's own pod timeout (pipeline.py) is set above this


class TrainStepError(UserError):
    pass


def job_name_for(run_id: str) -> str:
    """A DNS-1035 job name from a KFP run id (a UUID on a cluster, digits under kfp.local)."""
    slug = re.sub(r"[^a-z0-9]", "", run_id.lower())[:12] or "run"
    return f"arrcoc-{slug}"


def team_config(backend: str):
    from pipelines.jobs.team_config import TeamConfig

    if backend == "cluster":
        return TeamConfig.from_env()  # injected from the team-config ConfigMap (pipeline.py)
    path = os.environ.get(TEAM_CONFIG_FILE_ENV)
    return TeamConfig.from_file(path) if path else TeamConfig.local_default()


def team_knobs(knobs: TrainConfig, team) -> TrainConfig:
    """The knobs a run left "" (trainer/knobs.py: those with a team-config key) as the team-config sets them:
    strategy and precision as it chooses them for its GPU type, the base model (tiny when it names none)."""
    chosen = {"trainStrategy": team.trainer_strategy(), "trainPrecision": team.trainer_precision(),
              "baseModel": team.base_model or TrainConfig().base_model}
    return dataclasses.replace(knobs, **{k.name: chosen[k.team_config] for k in PIPELINE_KNOBS
                                         if k.team_config and getattr(knobs, k.name) == ""})


def trainer_args(knobs: TrainConfig, train_dir: str, eval_dir: str) -> list[str]:
    """Trainer flags: the run's knobs, then the staged datasets; --out belongs to the builder."""
    return [*flags(knobs), "--train-data", train_dir, "--eval-data", eval_dir]


def train_step(train_data, eval_data, adapter, job, knobs: TrainConfig, *, backend: str, run_id: str, image: str,
               workers: int, nproc_per_node: str, checkpoint_pvc: str, timeout_minutes: int, delete_policy: str,
               data_bucket: bool) -> None:
    """The train component's work on its artifacts: run_training, then the adapter's and the job's metadata.
    data_bucket is the compiled variant's: a team-config that disagrees fails the step before any job starts."""
    team = team_config(backend)
    if bool(team.data_bucket) != data_bucket:
        from pipelines.kfp_pipeline.variants import pipeline_name

        has = f"sets dataBucket={team.data_bucket!r}" if team.data_bucket else "sets no dataBucket"
        raise TrainStepError(f"this run is pipeline {pipeline_name(data_bucket)}, but the team's team-config {has}: "
                             f"run {pipeline_name(bool(team.data_bucket))} (arrcoc pipeline upload picks it)")
    metrics = run_training(backend=backend, run_id=run_id, train_dir=train_data.path, eval_dir=eval_data.path,
                           adapter_dir=adapter.path, job_dir=job.path, knobs=knobs, image=image, workers=workers,
                           nproc_per_node=nproc_per_node, checkpoint_pvc=checkpoint_pvc,
                           timeout_minutes=timeout_minutes, delete_policy=delete_policy)
    adapter.metadata.update({
        "framework": "arrcoc (peft LoRA + ARR-COC modules)", "pytorchjob": job_name_for(run_id), "run_id": run_id,
        "step": metrics["step"], "train_relevance_score": metrics.get("relevance_score", float("nan")),
        "tensions": metrics["tensions"], "train_data": train_data.uri,
    })
    job.metadata.update({"pytorchjob": job_name_for(run_id), "backend": backend, "workers": workers})


def run_training(*, backend: str, run_id: str, train_dir: str, eval_dir: str, adapter_dir: str, job_dir: str,
                 knobs: TrainConfig, image: str = BASE_IMAGE, workers: int = 1, nproc_per_node: str = "",
                 checkpoint_pvc: str = "", timeout_minutes: int = 720, delete_policy: str = "on-success",
                 workdir: str = "") -> dict[str, Any]:
    """Stage data, run the PyTorchJob, copy its adapter to adapter_dir; returns the trainer's metrics.json.

    job_dir receives pytorchjob.yaml, master.log and metrics.json. workdir is where the job backend keeps
    its logs (and, locally, the job's volumes); default: a sibling of adapter_dir.
    """
    from pipelines.jobs.backends import ClusterOptions, JobFailed
    from pipelines.jobs.client import backend_for
    from pipelines.jobs.cluster import DELETE_POLICIES
    from pipelines.jobs.pytorchjob import (
        CHECKPOINT_MOUNT,
        CHECKPOINT_VOLUME,
        METRICS_PORT,
        build_pytorchjob,
        to_manifest,
        to_yaml,
    )

    # The step's pod mounts checkpoint_pvc at CHECKPOINT_MOUNT (pipeline.py): that is how it reaches the replicas.
    mounts = {checkpoint_pvc: CHECKPOINT_MOUNT} if checkpoint_pvc else {}
    jobs = backend_for(backend, ClusterOptions(delete=delete_policy, step_mounts=mounts))
    if delete_policy not in DELETE_POLICIES:
        raise TrainStepError(f"delete_job={delete_policy!r} is not one of {', '.join(DELETE_POLICIES)}")
    if not 1 <= int(timeout_minutes) <= MAX_TIMEOUT_MINUTES:
        raise TrainStepError(f"train_timeout_minutes={timeout_minutes} must be in 1..{MAX_TIMEOUT_MINUTES}")
    team = team_config(backend)
    knobs = team_knobs(knobs, team)
    container_root = f"{CHECKPOINT_MOUNT}/{run_id}"
    job = build_pytorchjob(
        job_name_for(run_id), team=team, image=image,
        trainer_args=trainer_args(knobs, f"{container_root}/data/train", f"{container_root}/data/eval"),
        workers=int(workers), nproc_per_node=nproc_per_node or None, run_id=run_id,
        labels={"arrcoc.dev/launched-by": "kfp"}, active_deadline_seconds=int(timeout_minutes) * 60,
        checkpoint_mount=CHECKPOINT_MOUNT, metrics_port=int(os.environ.get(METRICS_PORT_ENV, METRICS_PORT)),
    )
    manifest = to_manifest(job)
    work = Path(workdir or Path(adapter_dir).parent / "pytorchjob")
    mount_root = jobs.volume_dir(manifest, CHECKPOINT_VOLUME, work)

    # The step runs as the trainer image's user (uid 1000), as the replicas do, so they own what it stages.
    run_root = mount_root / run_id
    (run_root / "data").mkdir(parents=True, exist_ok=True)
    copy_dir_atomic(train_dir, run_root / "data" / "train")
    copy_dir_atomic(eval_dir, run_root / "data" / "eval")
    out = Path(job_dir)
    write_text_atomic(out / "pytorchjob.yaml", to_yaml(manifest))

    try:
        result = jobs.run(manifest, work, timeout=int(timeout_minutes) * 60, log_stream=sys.stdout)
    except JobFailed as failed:
        write_bytes_atomic(out / "master.log", failed.result.master_log.read_bytes())
        raise
    write_bytes_atomic(out / "master.log", result.master_log.read_bytes())
    if not (run_root / "adapter").is_dir():
        raise RuntimeError(f"PyTorchJob {result.name} succeeded but wrote no adapter under {container_root}")
    copy_dir_atomic(run_root / "adapter", adapter_dir)
    write_bytes_atomic(out / "metrics.json", (run_root / "metrics.json").read_bytes())
    return json.loads((run_root / "metrics.json").read_text())
