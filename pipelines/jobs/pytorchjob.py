"""The one builder of PyTorchJob specs (kubeflow.org/v1): the pipeline's train step, `arrcoc pytorchjob render`,
the local runner and the Katib trial template all take their PyTorchJob from `build_pytorchjob`.

Why the spec looks the way it does (details in docs/pytorchjob.md):
- restartPolicy ExitCode: a preempted or OOM-killed replica (137, 143) is retried; a bug (1-127) fails at once.
- the checkpoint volume outlives pods (PVC, or a GCS bucket through the GCS FUSE CSI driver) and the trainer's
  --out is <mount>/<run-id>, so a restarted replica resumes from the same directory.
- an explicit `command` (python -m trainer, or torchrun through trainer/torchrun.py with several processes per
  pod) because Katib's metrics collector wraps the command in `sh -c`; sidecar.istio.io/inject "false" because
  a sidecar keeps pods alive.
- a read-only root filesystem with /tmp (the image's HOME and caches) an emptyDir;
- a `metrics` port where the trainer serves Prometheus metrics (--metrics-port, trainer/monitoring.py), which the
  team's PodMonitoring scrapes (kustomize/components/monitoring);
- a restricted-PSS security context whose fsGroup is applied only on a root mismatch, cpu/memory/GPU requests =
  limits (Guaranteed QoS; a namespace with a ResourceQuota rejects pods without requests).

What the operator admits and which images we run live in pipelines/jobs/rules.py: `build_pytorchjob` refuses
inputs that break them, and `check_manifest` applies them to manifests read from files.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from kubeflow.training import models as kf
from kubernetes import client as k8s

from pipelines.jobs.rules import (
    CLEAN_POD_POLICIES,
    CONTAINER_NAME,
    dns1035_problem,
    image_problem,
    nproc_problem,
    pytorchjob_problems,
)
from pipelines.jobs.team_config import DATA_MOUNT, TeamConfig
from trainer.errors import UserError
from trainer.monitoring import DEFAULT_PORT as METRICS_PORT

API_VERSION = "kubeflow.org/v1"
KIND = "PyTorchJob"
PORT_NAME = "pytorchjob-port"
DEFAULT_PORT = 23456
METRICS_PORT_NAME = "metrics"  # what the team's PodMonitoring scrapes (its endpoints[].port)

DEFAULT_IMAGE = "ghcr.io/arrcoc/arrcoc-trainer:0.1.0"  # trainer/Dockerfile, tagged with the project version
CHECKPOINT_VOLUME = "checkpoints"
CHECKPOINT_MOUNT = "/checkpoints"
DATA_VOLUME = "data"
SHM_VOLUME = "dshm"
# The image's HOME and caches (HF_HOME, MPLCONFIGDIR, TRITON_CACHE_DIR, ...: trainer/Dockerfile) live under /tmp,
# and the root filesystem is read-only: this emptyDir is the only writable place a replica has besides its volumes.
# Per pod, as a cache is; the limit is far above the compile and extension caches, and a base model is read from
# the data bucket, never downloaded into HF_HOME.
SCRATCH_VOLUME = "tmp"
SCRATCH_MOUNT = "/tmp"
SCRATCH_SIZE = "4Gi"
GCSFUSE_DRIVER = "gcsfuse.csi.storage.gke.io"
# GKE's GCS FUSE sidecar (docs: "Configure the Cloud Storage FUSE CSI driver sidecar container for GKE") gets
# its limits from these pod annotations; unset, a Standard cluster leaves cpu and memory unlimited, which a
# ResourceQuota on limits.* refuses, and ephemeral storage at GKE's 5Gi default, which is where gcsfuse stages
# a file before uploading it. Requests default to the limits. A LoRA checkpoint is far below 5Gi.
GCSFUSE_SIDECAR_LIMITS = {"gke-gcsfuse/cpu-limit": "500m", "gke-gcsfuse/memory-limit": "1Gi",
                          "gke-gcsfuse/ephemeral-storage-limit": "5Gi"}
# What every pod that mounts a bucket carries (the replicas here, the pipeline's prepare-data and evaluate steps):
# GKE's webhook injects the sidecar only into pods annotated gke-gcsfuse/volumes: "true".
GCSFUSE_POD_ANNOTATIONS = {"gke-gcsfuse/volumes": "true", **GCSFUSE_SIDECAR_LIMITS}
# The sidecar reaches GCS as the pod's Kubernetes service account through Workload Identity Federation: the bucket
# roles are granted to this account's principal in each team namespace (manifests/gcp/teams), and KFP multi-user
# runs pipeline steps as it too.
WORKLOAD_IDENTITY_ACCOUNT = "default-editor"
TEAM_LABEL = "arrcoc.dev/team"
RUN_ID_LABEL = "arrcoc.dev/run-id"
KUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# Katib substitutes only ${trialParameters.*} in a trial template; the Experiment declares trialName with
# reference ${trialSpec.Name}, so each trial gets its own run id (and checkpoint folder).
KATIB_TRIAL_NAME = "${trialParameters.trialName}"
RUN_AS_USER = 1000
# With fsGroup, the kubelet chowns a volume to the group before the container starts; the Filestore CSI driver
# declares fsGroupPolicy File, so it does so on the checkpoint share, recursively, at every replica start unless
# the share's root already has the group and its bits (kubernetes pkg/volume/volume_linux.go,
# skipPermissionChange/requiresPermissionChange): OnRootMismatch keeps a start from walking every checkpoint.
FS_GROUP_CHANGE_POLICY = "OnRootMismatch"

_DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_RUN_ID = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_LABEL_KEY = re.compile(r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")


class ManifestError(UserError):
    """A bad PyTorchJob input or manifest: printed as one line, exit code 2."""


def build_pytorchjob(
    name: str,
    *,
    team: TeamConfig,
    image: str = DEFAULT_IMAGE,
    trainer_args: Sequence[str] = (),
    namespace: str | None = None,
    workers: int = 1,
    nproc_per_node: str | None = None,
    run_id: str | None = None,
    labels: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    clean_pod_policy: str = "Running",
    active_deadline_seconds: int | None = None,
    ttl_seconds_after_finished: int | None = 86400,
    checkpoint_mount: str = CHECKPOINT_MOUNT,
    shm_size: str = "1Gi",
    metrics_port: int = METRICS_PORT,
) -> kf.KubeflowOrgV1PyTorchJob:
    """A PyTorchJob with one Master and `workers` Workers running the trainer.

    namespace defaults to the team's name; nproc_per_node to the team's GPUs per replica (at least 1);
    run_id to the job name (Katib templates pass KATIB_TRIAL_NAME). The trainer's --out is
    <checkpoint_mount>/<run_id>: the builder owns that flag, and --metrics-port (metrics_port 0: no exporter).
    """
    namespace = namespace or team.team
    run_id = run_id or name
    nproc = str(nproc_per_node) if nproc_per_node is not None else str(max(1, team.gpus_per_replica))
    _check_inputs(name, namespace, image, list(trainer_args), workers, nproc, run_id, team, clean_pod_policy,
                  active_deadline_seconds, ttl_seconds_after_finished, checkpoint_mount, metrics_port)
    all_labels = {TEAM_LABEL: team.team, RUN_ID_LABEL: run_id, **(labels or {})}
    for key, value in all_labels.items():
        if not _LABEL_KEY.fullmatch(key) or not isinstance(value, str):
            raise ManifestError(f"label {key!r}: not a valid Kubernetes label key/value")
    out_dir = f"{checkpoint_mount.rstrip('/')}/{run_id}"
    args = [*trainer_args, "--out", out_dir, *(["--metrics-port", str(metrics_port)] if metrics_port else [])]
    template = _pod_template(image, args, nproc, team, all_labels, env or {}, checkpoint_mount, shm_size,
                             metrics_port)
    replica_specs = {"Master": kf.KubeflowOrgV1ReplicaSpec(replicas=1, restart_policy="ExitCode", template=template)}
    if workers:
        replica_specs["Worker"] = kf.KubeflowOrgV1ReplicaSpec(replicas=workers, restart_policy="ExitCode",
                                                              template=template)
    job_labels = dict(all_labels)
    if team.kueue_queue:
        job_labels[KUEUE_LABEL] = team.kueue_queue
    return kf.KubeflowOrgV1PyTorchJob(
        api_version=API_VERSION,
        kind=KIND,
        metadata=k8s.V1ObjectMeta(name=name, namespace=namespace, labels=job_labels),
        spec=kf.KubeflowOrgV1PyTorchJobSpec(
            nproc_per_node=nproc,
            pytorch_replica_specs=replica_specs,
            run_policy=kf.KubeflowOrgV1RunPolicy(
                backoff_limit=team.backoff_limit,
                clean_pod_policy=clean_pod_policy,
                active_deadline_seconds=active_deadline_seconds,
                ttl_seconds_after_finished=ttl_seconds_after_finished,
            ),
        ),
    )


def trainer_command(nproc_per_node: str) -> list[str]:
    """One process per pod reads MASTER_ADDR/RANK/WORLD_SIZE itself; several go through torchrun, whose flags
    default to the PET_* variables the operator injects (nnodes, node rank, master address/port), by way of
    trainer/torchrun.py, which gives a signalled or failed group the exit code restartPolicy ExitCode retries
    (torchrun alone exits 1)."""
    if nproc_per_node == "1":
        return ["python", "-m", "trainer"]
    return ["python", "-m", "trainer.torchrun", "-m", "trainer"]


def to_manifest(job: kf.KubeflowOrgV1PyTorchJob) -> dict[str, Any]:
    """The plain dict a cluster (or the local runner) receives."""
    return k8s.ApiClient().sanitize_for_serialization(job)


def from_manifest(manifest: Mapping[str, Any]) -> kf.KubeflowOrgV1PyTorchJob:
    """The model object TrainingClient.create_job wants, from a manifest dict (as TrainingClient.get_job does)."""
    from kubeflow.training.api_client import ApiClient
    from kubeflow.training.utils.utils import FakeResponse

    return ApiClient().deserialize(FakeResponse(dict(manifest)), "KubeflowOrgV1PyTorchJob")


def to_yaml(job: kf.KubeflowOrgV1PyTorchJob | Mapping[str, Any]) -> str:
    manifest = job if isinstance(job, Mapping) else to_manifest(job)
    return yaml.safe_dump(dict(manifest), sort_keys=False, default_flow_style=False, width=120)


def pytorch_container(replica_spec: Mapping[str, Any]) -> dict[str, Any]:
    containers = (((replica_spec.get("template") or {}).get("spec") or {}).get("containers")) or []
    for container in containers:
        if container.get("name") == CONTAINER_NAME:
            return container
    raise ManifestError(f"no container named {CONTAINER_NAME!r}")


def check_manifest(manifest: Any, source: str = "manifest") -> None:
    """The operator's admission rules (pipelines/jobs/rules.py) plus the shape everything here relies on; the
    first problem raises a one-line ManifestError naming the field."""
    if not isinstance(manifest, Mapping):
        raise ManifestError(f"{source}: expected a PyTorchJob mapping, got {type(manifest).__name__}")
    if manifest.get("apiVersion") != API_VERSION or manifest.get("kind") != KIND:
        raise ManifestError(f"{source}: apiVersion/kind must be {API_VERSION}/{KIND}, "
                            f"got {manifest.get('apiVersion')}/{manifest.get('kind')}")
    if not (manifest.get("metadata") or {}).get("name"):
        raise ManifestError(f"{source}: metadata.name is missing")
    for path, message in pytorchjob_problems(manifest):
        raise ManifestError(f"{source}: {'.'.join(str(p) for p in path)}: {message}")


# ------------------------------------------------------------------------------------------------ internals


def _check_inputs(name: str, namespace: str, image: str, trainer_args: list[str], workers: int, nproc: str,
                  run_id: str, team: TeamConfig, clean_pod_policy: str, deadline: int | None, ttl: int | None,
                  checkpoint_mount: str, metrics_port: int) -> None:
    # The operator names pods and services <job>-worker-<i>; those must stay DNS-1035 labels of <= 63 chars.
    longest = f"{name}-worker-{max(workers - 1, 0)}" if workers else f"{name}-master-0"
    if dns1035_problem(name) or len(longest) > 63:
        raise ManifestError(f"job name {name!r} must be a DNS-1035 label (start with a letter; a-z, 0-9, '-') "
                            f"and short enough that {longest!r} has at most 63 characters")
    if not _DNS_1123.fullmatch(namespace) or len(namespace) > 63:
        raise ManifestError(f"namespace {namespace!r} must be a DNS-1123 label")
    if problem := image_problem(image):
        raise ManifestError(problem)
    if not all(isinstance(a, str) for a in trainer_args):
        raise ManifestError("trainer args must all be strings")
    if any(a == "--out" or a.startswith("--out=") for a in trainer_args):
        raise ManifestError("trainer args must not set --out: the builder points it at <checkpoint mount>/<run id>")
    if any(a == "--metrics-port" or a.startswith("--metrics-port=") for a in trainer_args):
        raise ManifestError("trainer args must not set --metrics-port: the builder sets it with the pod's metrics port")
    # A port a non-root container can bind (Pod Security restricted runs it as uid 1000) and no hostPort.
    if not isinstance(metrics_port, int) or isinstance(metrics_port, bool) or not (
            metrics_port == 0 or 1024 < metrics_port <= 65535) or metrics_port == DEFAULT_PORT:
        raise ManifestError(f"metrics_port={metrics_port!r} must be 0 (no exporter) or a port in 1025..65535 other "
                            f"than the rendezvous port {DEFAULT_PORT}")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise ManifestError(f"workers={workers!r} must be an integer >= 0 (the Master is always 1)")
    if problem := nproc_problem(nproc):
        raise ManifestError(f"nproc_per_node: {problem}")
    if nproc.isdigit() and 0 < team.gpus_per_replica < int(nproc):
        raise ManifestError(f"nproc_per_node={nproc} exceeds gpusPerReplica={team.gpus_per_replica}")
    if run_id != KATIB_TRIAL_NAME and (not _RUN_ID.fullmatch(run_id) or len(run_id) > 63):
        raise ManifestError(f"run id {run_id!r} must be 1-63 of A-Z a-z 0-9 - _ . (it names a directory and a label)")
    if clean_pod_policy not in CLEAN_POD_POLICIES:
        raise ManifestError(f"clean_pod_policy={clean_pod_policy!r} is not one of {', '.join(CLEAN_POD_POLICIES)}")
    if deadline is not None and deadline <= 0:
        raise ManifestError(f"active_deadline_seconds={deadline} must be > 0")
    if ttl is not None and ttl < 0:
        raise ManifestError(f"ttl_seconds_after_finished={ttl} must be >= 0")
    if not checkpoint_mount.startswith("/") or checkpoint_mount.rstrip("/") in ("", "/dev/shm", SCRATCH_MOUNT):
        raise ManifestError(f"checkpoint mount {checkpoint_mount!r} must be an absolute path other than /, /dev/shm "
                            f"and {SCRATCH_MOUNT}")
    if team.data_bucket and checkpoint_mount.rstrip("/") == DATA_MOUNT:
        raise ManifestError(f"checkpoint mount {checkpoint_mount!r} is where dataBucket is mounted; choose another")


def _pod_template(image: str, args: list[str], nproc: str, team: TeamConfig, labels: dict[str, str],
                  env: Mapping[str, str], checkpoint_mount: str, shm_size: str,
                  metrics_port: int) -> k8s.V1PodTemplateSpec:
    resources = {"cpu": team.cpu_per_replica, "memory": team.memory_per_replica}
    if team.gpus_per_replica:
        resources["nvidia.com/gpu"] = str(team.gpus_per_replica)
    annotations = {"sidecar.istio.io/inject": "false"}
    if team.uses_gcsfuse():
        annotations.update(GCSFUSE_POD_ANNOTATIONS)
    shm = k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=shm_size)
    scratch = k8s.V1EmptyDirVolumeSource(size_limit=SCRATCH_SIZE)
    volumes = [_checkpoint_volume(team), k8s.V1Volume(name=SHM_VOLUME, empty_dir=shm),
               k8s.V1Volume(name=SCRATCH_VOLUME, empty_dir=scratch)]
    mounts = [k8s.V1VolumeMount(name=CHECKPOINT_VOLUME, mount_path=checkpoint_mount.rstrip("/")),
              k8s.V1VolumeMount(name=SHM_VOLUME, mount_path="/dev/shm"),
              k8s.V1VolumeMount(name=SCRATCH_VOLUME, mount_path=SCRATCH_MOUNT)]
    if team.data_bucket:
        # The team's base models and datasets: read-only, so no replica can change what another one reads.
        volumes.append(k8s.V1Volume(name=DATA_VOLUME, csi=k8s.V1CSIVolumeSource(
            driver=GCSFUSE_DRIVER, read_only=True,
            volume_attributes={"bucketName": team.data_bucket,
                               "mountOptions": f"implicit-dirs,uid={RUN_AS_USER},gid={RUN_AS_USER}"})))
        mounts.append(k8s.V1VolumeMount(name=DATA_VOLUME, mount_path=DATA_MOUNT, read_only=True))
    container = k8s.V1Container(
        name=CONTAINER_NAME,
        image=image,
        command=trainer_command(nproc),
        args=args,
        env=[k8s.V1EnvVar(name=k, value=str(v)) for k, v in sorted(env.items())] or None,
        ports=[k8s.V1ContainerPort(name=PORT_NAME, container_port=DEFAULT_PORT),
               *([k8s.V1ContainerPort(name=METRICS_PORT_NAME, container_port=metrics_port)] if metrics_port else [])],
        resources=k8s.V1ResourceRequirements(requests=dict(resources), limits=dict(resources)),
        volume_mounts=mounts,
        security_context=k8s.V1SecurityContext(
            allow_privilege_escalation=False, capabilities=k8s.V1Capabilities(drop=["ALL"]),
            read_only_root_filesystem=True),
    )
    return k8s.V1PodTemplateSpec(
        metadata=k8s.V1ObjectMeta(labels=dict(labels), annotations=annotations),
        spec=k8s.V1PodSpec(
            containers=[container],
            volumes=volumes,
            node_selector=team.pod_node_selector() or None,
            tolerations=[_toleration(t) for t in team.tolerations] or None,
            priority_class_name=team.priority_class_name or None,
            service_account_name=WORKLOAD_IDENTITY_ACCOUNT if team.uses_gcsfuse() else None,
            security_context=k8s.V1PodSecurityContext(
                run_as_non_root=True, run_as_user=RUN_AS_USER, run_as_group=RUN_AS_USER, fs_group=RUN_AS_USER,
                fs_group_change_policy=FS_GROUP_CHANGE_POLICY,
                seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault")),
        ),
    )


def _checkpoint_volume(team: TeamConfig) -> k8s.V1Volume:
    if team.checkpoint_bucket:
        # uid/gid: the FUSE mount is owned by root otherwise, and the trainer runs as RUN_AS_USER.
        # rename-dir-limit: the trainer publishes a checkpoint by renaming its folder, which gcsfuse refuses on
        # a flat bucket without it (and does non-atomically with it; a hierarchical-namespace bucket is atomic).
        return k8s.V1Volume(name=CHECKPOINT_VOLUME, csi=k8s.V1CSIVolumeSource(
            driver=GCSFUSE_DRIVER,
            volume_attributes={"bucketName": team.checkpoint_bucket,
                               "mountOptions": f"implicit-dirs,uid={RUN_AS_USER},gid={RUN_AS_USER},"
                                               f"rename-dir-limit=1000"}))
    if team.checkpoint_pvc:
        return k8s.V1Volume(name=CHECKPOINT_VOLUME, persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
            claim_name=team.checkpoint_pvc))
    # Only TeamConfig.local_default() has neither: the local runner maps this volume to a directory that
    # outlives its processes; on a cluster an emptyDir would die with the pod.
    return k8s.V1Volume(name=CHECKPOINT_VOLUME, empty_dir=k8s.V1EmptyDirVolumeSource())


def _toleration(t: Mapping[str, Any]) -> k8s.V1Toleration:
    return k8s.V1Toleration(key=t.get("key"), operator=t.get("operator"), value=t.get("value"),
                            effect=t.get("effect"), toleration_seconds=t.get("tolerationSeconds"))
