"""A team's scheduling facts, read from the `team-config` ConfigMap that Kustomize writes per namespace.

Contract with kustomize/ (every value is a string, as in any ConfigMap):

    team               team name                       e.g. "vision"
    capacity           spot | on-demand
    gpuType            GKE accelerator, "" = none       e.g. "nvidia-l4"
    gpusPerReplica     int >= 0
    cpuPerReplica      Kubernetes quantity              e.g. "8", "500m"
    memoryPerReplica   Kubernetes quantity              e.g. "32Gi"
    nodeSelector       JSON object of string -> string
    tolerations        JSON list of Kubernetes tolerations
    kueueQueue         LocalQueue name, "" = no Kueue
    checkpointBucket   GCS bucket name, "" = none (then checkpointPVC)
    checkpointPVC      PVC name, used when checkpointBucket is ""
    backoffLimit       int >= 0
    priorityClassName  "" = none
    trainPrecision     optional: fp32 | bf16, "" or absent = bf16 on a GPU type that has it, else fp32
    trainStrategy      optional: ddp | deepspeed | fsdp, "" or absent = ddp
    baseModel          optional: the trainer's --base-model (tiny | a path under /data | a hub id); "" = tiny
    dataBucket         optional: GCS bucket of models and datasets, mounted read-only at /data; "" = none
    trainData          optional: --train-data of Katib trials (a path under /data); "" = synthetic scenes
    evalData           optional: --eval-data of Katib trials (a path under /data); "" = synthetic scenes

The same ConfigMap reaches three readers: the PyTorchJob builder (from_file / from_configmap), the KFP train
step (from_env: kfp.kubernetes.use_config_map_as_env maps each key to the env name in ENV_NAMES; the optional
keys through a second, optional mapping, so a ConfigMap without them still starts the pod) and the Katib
trial templates (generated per team by `arrcoc compile`).
Bad input raises TeamConfigError (exit code 2) with one line naming the key.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes.utils.quantity import parse_quantity

from pipelines.yaml_files import load_documents
from trainer.errors import UserError

CONFIGMAP_NAME = "team-config"
CAPACITIES = ("spot", "on-demand")
TOLERATION_KEYS = ("key", "operator", "value", "effect", "tolerationSeconds")
TOLERATION_OPERATORS = ("Exists", "Equal")
TOLERATION_EFFECTS = ("", "NoSchedule", "PreferNoSchedule", "NoExecute")
# GKE's node labels for spot capacity and accelerators; the builder derives node selectors from them.
SPOT_LABEL = "cloud.google.com/gke-spot"
ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"

# ConfigMap key -> dataclass field, in the contract's order.
KEYS: dict[str, str] = {
    "team": "team",
    "capacity": "capacity",
    "gpuType": "gpu_type",
    "gpusPerReplica": "gpus_per_replica",
    "cpuPerReplica": "cpu_per_replica",
    "memoryPerReplica": "memory_per_replica",
    "nodeSelector": "node_selector",
    "tolerations": "tolerations",
    "kueueQueue": "kueue_queue",
    "checkpointBucket": "checkpoint_bucket",
    "checkpointPVC": "checkpoint_pvc",
    "backoffLimit": "backoff_limit",
    "priorityClassName": "priority_class_name",
    "trainPrecision": "train_precision",
    "trainStrategy": "train_strategy",
    "baseModel": "base_model",
    "dataBucket": "data_bucket",
    "trainData": "train_data",
    "evalData": "eval_data",
}
# Keys a ConfigMap may leave out ("" then). The KFP train step maps them to env through a second, optional
# use_config_map_as_env, so a ConfigMap without them still starts its pod.
OPTIONAL_KEYS = ("trainPrecision", "trainStrategy", "baseModel", "dataBucket", "trainData", "evalData")
# GKE accelerators with bf16 tensor cores (L4, A100, H100, H200); others (T4, V100, P100) train in fp32.
BF16_ACCELERATORS = ("nvidia-l4", "nvidia-tesla-a100", "nvidia-a100-80gb", "nvidia-h100-80gb",
                     "nvidia-h100-mega-80gb", "nvidia-h200-141gb")
# Where every pod that reads the team's models and datasets (prepare-data, each replica, evaluate) sees dataBucket.
DATA_MOUNT = "/data"
# The claim kustomize/components/data-bucket binds to dataBucket in the team namespace; the pipeline's prepare-data
# and evaluate steps mount it at DATA_MOUNT (kfp-kubernetes mounts claims, not inline CSI volumes).
DATA_CLAIM = "data-bucket"


def _env_name(key: str) -> str:
    return "ARRCOC_TEAM_" + re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key).upper()


# ConfigMap key -> env var name (gpusPerReplica -> ARRCOC_TEAM_GPUS_PER_REPLICA, checkpointPVC ->
# ARRCOC_TEAM_CHECKPOINT_PVC). The pipeline passes exactly this mapping to use_config_map_as_env (OPTIONAL_KEYS in
# a second, optional call).
ENV_NAMES: dict[str, str] = {key: _env_name(key) for key in KEYS}

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")
# Katib's metrics collector runs the trial command through `sh -c`: no space or quote may reach its arguments.
_ARGUMENT = re.compile(r"[^\s'\"\\]+")
# kustomize's configMapGenerator appends a content hash unless disableNameSuffixHash is set.
_GENERATED_NAME = re.compile(re.escape(CONFIGMAP_NAME) + r"(-[a-z0-9]{10})?")


class TeamConfigError(UserError):
    """Bad team-config: printed as one line, exit code 2."""


@dataclass(frozen=True)
class TeamConfig:
    team: str
    capacity: str
    gpu_type: str
    gpus_per_replica: int
    cpu_per_replica: str
    memory_per_replica: str
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    kueue_queue: str = ""
    checkpoint_bucket: str = ""
    checkpoint_pvc: str = ""
    backoff_limit: int = 3
    priority_class_name: str = ""
    train_precision: str = ""
    train_strategy: str = ""
    base_model: str = ""
    data_bucket: str = ""
    train_data: str = ""
    eval_data: str = ""

    # ---------------------------------------------------------------- readers

    @classmethod
    def from_configmap(cls, obj: Mapping[str, Any], source: str = CONFIGMAP_NAME) -> TeamConfig:
        """From a ConfigMap manifest (with `data`) or from its data mapping alone."""
        if not isinstance(obj, Mapping):
            raise TeamConfigError(f"{source}: expected a ConfigMap or its data mapping, got {type(obj).__name__}")
        data = obj.get("data") if obj.get("kind") == "ConfigMap" else obj
        if not isinstance(data, Mapping):
            raise TeamConfigError(f"{source}: ConfigMap has no data mapping")
        unknown = [k for k in data if k not in KEYS]
        if unknown:
            raise TeamConfigError(f"{source}: unknown key {unknown[0]!r}; allowed keys: {', '.join(KEYS)}")
        data = {**{k: "" for k in OPTIONAL_KEYS}, **data}
        missing = [k for k in KEYS if k not in data]
        if missing:
            raise TeamConfigError(f"{source}: missing key {missing[0]!r}")
        for key in KEYS:
            if not isinstance(data[key], str):
                raise TeamConfigError(f"{source}: {key} must be a string (ConfigMap values are strings; quote it)")
        config = cls._parse(data, source)
        if not config.checkpoint_bucket and not config.checkpoint_pvc:
            # A cluster job without durable storage would lose every checkpoint with its pods.
            raise TeamConfigError(f"{source}: checkpointBucket and checkpointPVC are both empty; set one")
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> TeamConfig:
        """From a YAML file holding the ConfigMap: a single object or a multi-document stream
        (e.g. `kubectl kustomize kustomize/overlays/<team>` output)."""
        docs = load_documents(path, TeamConfigError, label=f"team config file {path}")
        return cls._from_documents(docs, str(path), f"team config file {path}")

    @classmethod
    def from_overlay(cls, directory: str | Path) -> TeamConfig:
        """As `kubectl kustomize DIRECTORY` renders it: a team's overlay (kustomize/overlays/<team>), components
        included."""
        import subprocess

        import yaml

        try:
            result = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True,
                                    check=False)
        except FileNotFoundError:
            raise TeamConfigError(f"{directory}: kubectl is not installed (it renders the team's overlay)") from None
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["failed"])[-1]
            raise TeamConfigError(f"kubectl kustomize {directory}: {last}")
        return cls._from_documents(list(yaml.safe_load_all(result.stdout)), str(directory), f"overlay {directory}")

    @classmethod
    def _from_documents(cls, docs: list, source: str, label: str) -> TeamConfig:
        maps = [d for d in docs if isinstance(d, dict) and d.get("kind") == "ConfigMap"]
        named = [d for d in maps if _GENERATED_NAME.fullmatch(str((d.get("metadata") or {}).get("name", "")))]
        if len(named) == 1:
            return cls.from_configmap(named[0], source=source)
        if len(named) > 1:
            raise TeamConfigError(f"{label}: holds {len(named)} ConfigMaps named {CONFIGMAP_NAME}")
        found = ", ".join(str((d.get("metadata") or {}).get("name")) for d in maps) or "none"
        raise TeamConfigError(f"{label}: no ConfigMap named {CONFIGMAP_NAME} (ConfigMaps found: {found})")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TeamConfig:
        """From the env vars that kfp.kubernetes.use_config_map_as_env injects (names in ENV_NAMES)."""
        environ = os.environ if environ is None else environ
        missing = [key for key, env in ENV_NAMES.items() if env not in environ and key not in OPTIONAL_KEYS]
        if missing:
            key = missing[0]
            raise TeamConfigError(f"environment: {ENV_NAMES[key]} (team-config key {key}) is not set")
        return cls.from_configmap({key: environ[env] for key, env in ENV_NAMES.items() if env in environ},
                                  source="environment")

    def uses_gcsfuse(self) -> bool:
        """Whether its pods mount a bucket through the GCS FUSE CSI driver (checkpoints, or models and data)."""
        return bool(self.checkpoint_bucket or self.data_bucket)

    def trainer_precision(self) -> str:
        """--precision for this team's GPUs: bf16 where the accelerator has bf16 tensor cores."""
        bf16 = self.gpus_per_replica > 0 and self.gpu_type in BF16_ACCELERATORS
        return self.train_precision or ("bf16" if bf16 else "fp32")

    def trainer_strategy(self) -> str:
        """--strategy: ddp unless the team set another (fsdp for bases that do not fit replicated)."""
        return self.train_strategy or "ddp"

    @classmethod
    def local_default(cls) -> TeamConfig:
        """The laptop: no GPU, no tolerations, no durable storage (the builder then uses an emptyDir)."""
        return cls(
            team="local", capacity="on-demand", gpu_type="", gpus_per_replica=0, cpu_per_replica="1",
            memory_per_replica="2Gi", backoff_limit=3,
        )

    # ---------------------------------------------------------------- writers

    def to_configmap_data(self) -> dict[str, str]:
        """The ConfigMap data this config reads back from (round-trip)."""
        out: dict[str, str] = {}
        for key, name in KEYS.items():
            value = getattr(self, name)
            out[key] = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
        return out

    def pod_node_selector(self) -> dict[str, str]:
        """nodeSelector plus what capacity and gpuType imply on GKE (one fact, one place)."""
        selector = dict(self.node_selector)
        if self.capacity == "spot":
            selector[SPOT_LABEL] = "true"
        if self.gpu_type and self.gpus_per_replica > 0:
            selector[ACCELERATOR_LABEL] = self.gpu_type
        return selector

    # ---------------------------------------------------------------- parsing

    @classmethod
    def _parse(cls, data: Mapping[str, str], source: str) -> TeamConfig:
        def fail(key: str, why: str) -> TeamConfigError:
            return TeamConfigError(f"{source}: {key}={data[key]!r} {why}")

        team = data["team"]
        if not _DNS_LABEL.fullmatch(team) or len(team) > 63:
            raise fail("team", "must be a DNS-1123 label (lower-case letters, digits, '-')")
        if data["capacity"] not in CAPACITIES:
            raise fail("capacity", f"is not one of {', '.join(CAPACITIES)}")
        ints = {}
        for key in ("gpusPerReplica", "backoffLimit"):
            try:
                ints[key] = int(data[key])
            except ValueError:
                raise fail(key, "is not an integer") from None
            if ints[key] < 0:
                raise fail(key, "must be >= 0")
        if ints["gpusPerReplica"] > 0 and not data["gpuType"]:
            raise fail("gpuType", "must name the accelerator when gpusPerReplica > 0")
        for key in ("cpuPerReplica", "memoryPerReplica"):
            try:
                quantity = parse_quantity(data[key])
            except ValueError:
                raise fail(key, "is not a Kubernetes quantity (e.g. 4, 500m, 16Gi)") from None
            if quantity <= 0:
                raise fail(key, "must be > 0")
        selector = _json(data, "nodeSelector", dict, source)
        for k, v in selector.items():
            if not isinstance(v, str):
                raise fail("nodeSelector", f"value of {k!r} must be a string")
        tolerations = _json(data, "tolerations", list, source)
        for i, tol in enumerate(tolerations):
            _check_toleration(tol, f"{source}: tolerations[{i}]")
        for key in ("kueueQueue", "checkpointPVC", "priorityClassName"):
            if data[key] and not _DNS_SUBDOMAIN.fullmatch(data[key]):
                raise fail(key, "must be empty or a Kubernetes object name")
        from trainer.config import PRECISIONS, STRATEGIES

        for key, allowed in (("trainPrecision", PRECISIONS), ("trainStrategy", STRATEGIES)):
            if data[key] and data[key] not in allowed:
                raise fail(key, f"is not one of {', '.join(allowed)} (or empty)")
        for key in ("checkpointBucket", "dataBucket"):
            if data[key] and not _BUCKET.fullmatch(data[key]):
                raise fail(key, "must be empty or a GCS bucket name (no gs:// prefix)")
        if data["baseModel"] and not _ARGUMENT.fullmatch(data["baseModel"]):
            raise fail("baseModel", "must be empty, tiny, a path or a hub id, without spaces or quotes")
        for key in ("trainData", "evalData"):
            if data[key] and (not _ARGUMENT.fullmatch(data[key]) or not data[key].startswith(DATA_MOUNT + "/")):
                raise fail(key, f"must be empty or a path under {DATA_MOUNT}/ (where dataBucket is mounted)")
            if data[key] and not data["dataBucket"]:
                raise fail(key, f"needs dataBucket: {DATA_MOUNT} is where that bucket is mounted")
        config = cls(
            team=team, capacity=data["capacity"], gpu_type=data["gpuType"], gpus_per_replica=ints["gpusPerReplica"],
            cpu_per_replica=data["cpuPerReplica"], memory_per_replica=data["memoryPerReplica"],
            node_selector=dict(selector), tolerations=list(tolerations), kueue_queue=data["kueueQueue"],
            checkpoint_bucket=data["checkpointBucket"], checkpoint_pvc=data["checkpointPVC"],
            backoff_limit=ints["backoffLimit"], priority_class_name=data["priorityClassName"],
            train_precision=data["trainPrecision"], train_strategy=data["trainStrategy"],
            base_model=data["baseModel"], data_bucket=data["dataBucket"], train_data=data["trainData"],
            eval_data=data["evalData"],
        )
        # capacity/gpuType and an explicit nodeSelector must not disagree, or pods would never schedule.
        spot = selector.get(SPOT_LABEL)
        if spot is not None and (spot == "true") != (config.capacity == "spot"):
            raise fail("nodeSelector", f"sets {SPOT_LABEL}={spot!r}, which contradicts capacity={config.capacity!r}")
        accelerator = selector.get(ACCELERATOR_LABEL)
        if accelerator is not None and config.gpus_per_replica > 0 and accelerator != config.gpu_type:
            raise fail("nodeSelector",
                       f"sets {ACCELERATOR_LABEL}={accelerator!r}, which contradicts gpuType={config.gpu_type!r}")
        return config


def _json(data: Mapping[str, str], key: str, kind: type, source: str) -> Any:
    try:
        value = json.loads(data[key])
    except json.JSONDecodeError as exc:
        raise TeamConfigError(f"{source}: {key} is not valid JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(value, kind):
        want = "a JSON object" if kind is dict else "a JSON list"
        raise TeamConfigError(f"{source}: {key} must be {want}, got {type(value).__name__}")
    return value


def _check_toleration(tol: Any, where: str) -> None:
    if not isinstance(tol, dict):
        raise TeamConfigError(f"{where} must be an object")
    unknown = [k for k in tol if k not in TOLERATION_KEYS]
    if unknown:
        raise TeamConfigError(f"{where}: unknown field {unknown[0]!r}; allowed: {', '.join(TOLERATION_KEYS)}")
    operator = tol.get("operator", "Equal")
    if operator not in TOLERATION_OPERATORS:
        raise TeamConfigError(f"{where}: operator={operator!r} is not one of {', '.join(TOLERATION_OPERATORS)}")
    if tol.get("effect", "") not in TOLERATION_EFFECTS:
        raise TeamConfigError(f"{where}: effect={tol['effect']!r} "
                              "is not one of NoSchedule, PreferNoSchedule, NoExecute")
    if operator == "Exists" and tol.get("value"):
        raise TeamConfigError(f"{where}: value must be empty when operator is Exists")
    for k in ("key", "value"):
        if k in tol and not isinstance(tol[k], str):
            raise TeamConfigError(f"{where}: {k} must be a string")
    if "tolerationSeconds" in tol and (not isinstance(tol["tolerationSeconds"], int)
                                       or isinstance(tol["tolerationSeconds"], bool)):
        raise TeamConfigError(f"{where}: tolerationSeconds must be an integer")
