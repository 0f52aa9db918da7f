"""The train step's work: one PyTorchJob (pipelines.pytorchjob), launched on the cluster or rehearsed here.

Getting the datasets to the replicas. A KFP step's input artifacts are downloaded into the step's own pod;
the PyTorchJob's replicas are other pods and cannot see them. So the step stages both datasets on the team's
checkpoint volume, keyed by run id, and the trainer reads them from there:

    <checkpoint mount>/<run id>/data/train, .../data/eval   (staged by this step)
    <checkpoint mount>/<run id>/adapter, metrics.json, checkpoints/   (written by the trainer: --out)

On the cluster the step mounts the team's checkpoint PVC (pipeline parameter checkpoint_pvc, mounted with
kfp.kubernetes.mount_pvc at the same path the replicas use) and checks that team-config names the same PVC.
Locally the local runner maps that mount path to <workdir>/volumes/checkpoints, so the step stages into that
directory and passes the very same container paths: the local run rehearses the cluster's data path.
A KFP retry of the step reuses the run id, so the trainer (--resume auto) continues from its last checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from pipelines.components import BASE_IMAGE

BACKENDS = ("cluster", "local")
# Locally, a team-config file (the ConfigMap YAML) may stand in for TeamConfig.local_default().
TEAM_CONFIG_FILE_ENV = "ARRCOC_TEAM_CONFIG_FILE"
MAX_TIMEOUT_MINUTES = 24 * 60  # the train task's own pod timeout (pipeline.py) is set above this


class TrainStepError(ValueError):
    exit_code = 2


def job_name_for(run_id: str) -> str:
    """A DNS-1035 job name from a KFP run id (a UUID on a cluster, digits under kfp.local)."""
    slug = re.sub(r"[^a-z0-9]", "", run_id.lower())[:12] or "run"
    return f"arrcoc-{slug}"


def team_config(backend: str):
    from pipelines.team_config import TeamConfig

    if backend == "cluster":
        return TeamConfig.from_env()  # injected from the team-config ConfigMap (pipeline.py)
    path = os.environ.get(TEAM_CONFIG_FILE_ENV)
    return TeamConfig.from_file(path) if path else TeamConfig.local_default()


def trainer_args(params: dict[str, Any], train_dir: str, eval_dir: str) -> list[str]:
    """Trainer flags (trainer/config.py names) from the pipeline's parameters; --out belongs to the builder."""
    args = []
    for name, value in params.items():
        flag = name.replace("_", "-")
        if isinstance(value, bool):  # on/off flags (argparse.BooleanOptionalAction): --flag or --no-flag
            args.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            args += ["--" + flag, str(value)]
    return [*args, "--train-data", train_dir, "--eval-data", eval_dir]


def _copy_dir(src: Path, dst: Path) -> None:
    """Replace dst by a copy of src; a reader never sees a half-copied directory."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def run_training(*, backend: str, run_id: str, train_dir: str, eval_dir: str, adapter_dir: str, job_dir: str,
                 params: dict[str, Any], image: str = BASE_IMAGE, workers: int = 1, nproc_per_node: str = "",
                 checkpoint_pvc: str = "", timeout_minutes: int = 720, delete_policy: str = "on-success",
                 local_workdir: str = "") -> dict[str, Any]:
    """Stage data, run the PyTorchJob, copy its adapter to adapter_dir; returns the trainer's metrics.json.

    job_dir receives pytorchjob.yaml, master.log and metrics.json. local_workdir is where the local runner
    keeps its logs and volumes (default: a sibling of adapter_dir).
    """
    from pipelines.launcher import DELETE_POLICIES
    from pipelines.pytorchjob import CHECKPOINT_MOUNT, CHECKPOINT_VOLUME, build_pytorchjob, to_manifest, to_yaml

    if backend not in BACKENDS:
        raise TrainStepError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    if delete_policy not in DELETE_POLICIES:
        raise TrainStepError(f"delete_job={delete_policy!r} is not one of {', '.join(DELETE_POLICIES)}")
    if not 1 <= int(timeout_minutes) <= MAX_TIMEOUT_MINUTES:
        raise TrainStepError(f"train_timeout_minutes={timeout_minutes} must be in 1..{MAX_TIMEOUT_MINUTES}")
    team = team_config(backend)
    if backend == "cluster":
        if not team.checkpoint_pvc:
            raise TrainStepError(
                f"team-config checkpointPVC is empty (checkpointBucket={team.checkpoint_bucket!r}): the train step "
                f"stages data through a PVC; name one in checkpointPVC (a GCS FUSE PVC bound to the bucket works)")
        if team.checkpoint_pvc != checkpoint_pvc:
            raise TrainStepError(f"pipeline parameter checkpoint_pvc={checkpoint_pvc!r} differs from team-config "
                                 f"checkpointPVC={team.checkpoint_pvc!r}: the replicas would not see the staged data")
        mount_root = Path(CHECKPOINT_MOUNT)
        workdir = None
    else:
        workdir = Path(local_workdir or Path(adapter_dir).parent / "local-pytorchjob")
        # pipelines/local_runner.py maps each volumeMount to <workdir>/volumes/<volume name>.
        mount_root = workdir / "volumes" / CHECKPOINT_VOLUME

    # The step runs as the trainer image's user (uid 1000), as the replicas do, so they own what it stages.
    run_root = mount_root / run_id
    (run_root / "data").mkdir(parents=True, exist_ok=True)
    _copy_dir(Path(train_dir), run_root / "data" / "train")
    _copy_dir(Path(eval_dir), run_root / "data" / "eval")
    container_root = f"{CHECKPOINT_MOUNT}/{run_id}"
    job = build_pytorchjob(
        job_name_for(run_id), team=team, image=image,
        trainer_args=trainer_args(params, f"{container_root}/data/train", f"{container_root}/data/eval"),
        workers=int(workers), nproc_per_node=nproc_per_node or None, run_id=run_id,
        labels={"arrcoc.dev/launched-by": "kfp"}, active_deadline_seconds=int(timeout_minutes) * 60,
        checkpoint_mount=CHECKPOINT_MOUNT,
    )
    manifest = to_manifest(job)
    out = Path(job_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pytorchjob.yaml").write_text(to_yaml(manifest))

    timeout_s = int(timeout_minutes) * 60
    if backend == "cluster":
        from pipelines.launcher import launch

        result = launch(job, timeout=timeout_s, delete=delete_policy, log_stream=sys.stdout)
        (out / "master.log").write_text(result.master_log)
    else:
        from pipelines.local_runner import run_local

        local = run_local(manifest, workdir, timeout=timeout_s, log_stream=sys.stdout)
        shutil.copyfile(local.master_log, out / "master.log")
        if not local.succeeded:
            final = local.final
            raise RuntimeError(f"PyTorchJob {local.name} failed: {final.get('reason', 'Failed')}: "
                               f"{final.get('message', 'no message')} (replica logs: {workdir / 'logs'})")

    if not (run_root / "adapter").is_dir():
        raise RuntimeError(f"PyTorchJob {job.metadata.name} succeeded but wrote no adapter under {container_root}")
    _copy_dir(run_root / "adapter", Path(adapter_dir))
    shutil.copyfile(run_root / "metrics.json", out / "metrics.json")
    return json.loads((run_root / "metrics.json").read_text())
