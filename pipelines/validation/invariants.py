"""Project rules across objects: team namespaces are fenced, pods are sized and pinned to a
version, and every PyTorchJob tolerates the nodes its team's team-config sends it to."""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import yaml

from pipelines.jobs.pytorchjob import FS_GROUP_CHANGE_POLICY as ON_ROOT_MISMATCH
from pipelines.jobs.pytorchjob import GCSFUSE_DRIVER, WORKLOAD_IDENTITY_ACCOUNT
from pipelines.jobs.rules import image_problem
from pipelines.jobs.team_config import CONFIGMAP_NAME as TEAM_CONFIG
from pipelines.jobs.team_config import DATA_CLAIM, DATA_MOUNT, KEYS, TeamConfig, TeamConfigError
from pipelines.validation.controller_pods import kfp_runner_account
from pipelines.validation.findings import Doc, Finding
from pipelines.validation.podsecurity import containers

QUOTA_KEYS = (
    ("requests.cpu", "cpu"), ("requests.memory", "memory"), ("requests.nvidia.com/gpu",),
    ("pods",), ("persistentvolumeclaims",),
)
TEAM_LABEL = "arrcoc.io/team"
# The namespace label Kubeflow 26.03's NetworkPolicies admit into ml-pipeline, metadata-grpc-server, seaweedfs and
# katib-db-manager (common/kubeflow-namespace/base/kubeflow/*.yaml); the profile controller sets it only on a
# namespace that does not already have the key.
PROFILE_LABEL = ("app.kubernetes.io/part-of", "kubeflow-profile")
# The service accounts Kubeflow's profile controller creates in every Profile's namespace (kubeflow/dashboard
# components/profile-controller/controllers/profile_controller.go, Reconcile: default-editor, default-viewer).
PROFILE_ACCOUNTS = ("default-editor", "default-viewer")


def check_pod_spec(doc: Doc, path: list, spec: dict, images_only: bool = False) -> Iterator[Finding]:
    security = spec.get("securityContext") or {}
    claims = [v.get("name") for v in spec.get("volumes") or [] if "persistentVolumeClaim" in v]
    if not images_only and claims and "fsGroup" in security and security.get("fsGroupChangePolicy") != ON_ROOT_MISMATCH:
        yield doc.finding(path + ["securityContext", "fsGroupChangePolicy"],
                          f"must be {ON_ROOT_MISMATCH} with fsGroup on a claim ({', '.join(map(str, claims))}): "
                          "otherwise the kubelet re-chowns the whole volume at every start (the Filestore CSI driver "
                          "declares fsGroupPolicy File), slower as checkpoints accumulate")
    for cpath, container in containers(spec):
        here = path + cpath
        image = container.get("image")
        if isinstance(image, str) and (problem := image_problem(image)):
            yield doc.finding(here + ["image"], problem)
        if cpath[0] == "ephemeralContainers" or images_only:
            continue
        resources = container.get("resources") or {}
        for section in ("requests", "limits"):
            have = resources.get(section) or {}
            missing = [r for r in ("cpu", "memory") if r not in have]
            if missing:
                yield doc.finding(here + ["resources", section], f"must declare {' and '.join(missing)}")


_ERROR_KEY = re.compile(r"^[^:]*: (?:unknown key |missing key )?'?([A-Za-z]+)")


def _parse_team_config(doc: Doc) -> tuple[TeamConfig | None, list[Finding]]:
    """team-config read by the same code the PyTorchJob builder and the pipeline use, and what is wrong with it."""
    try:
        return TeamConfig.from_configmap(doc.obj, source=TEAM_CONFIG), []
    except TeamConfigError as error:
        message = str(error).split(": ", 1)[-1]
        key = _ERROR_KEY.match(str(error))
        path = ["data", key.group(1)] if key and key.group(1) in {*KEYS, *(doc.obj.get("data") or {})} else ["data"]
        return None, [doc.finding(path, message)]


def tolerates(tolerations: list, taint: dict) -> bool:
    for t in tolerations or []:
        if t.get("effect") not in (None, "", taint.get("effect")):
            continue
        if t.get("operator") == "Exists" and t.get("key") in (None, "", taint.get("key")):
            return True
        if (t.get("key") == taint.get("key") and t.get("operator", "Equal") == "Equal"
                and str(t.get("value", "")) == str(taint.get("value", ""))):
            return True
    return False


def team_configs(docs: list[Doc]) -> dict[str, TeamConfig]:
    parsed = {d.namespace: _parse_team_config(d)[0] for d in docs
              if d.kind == "ConfigMap" and d.name == TEAM_CONFIG and d.namespace}
    return {namespace: config for namespace, config in parsed.items() if config is not None}


def check_job_scheduling(doc: Doc, job: dict, prefix: list, configs: dict[str, TeamConfig]) -> Iterator[Finding]:
    """Every replica of a PyTorchJob tolerates each toleration of its namespace's team-config and
    selects the same nodes; namespaces without a known team-config are not team namespaces."""
    namespace = (job.get("metadata") or {}).get("namespace") or doc.namespace
    config = configs.get(namespace)
    if config is None:
        return
    for rtype, replica in ((job.get("spec") or {}).get("pytorchReplicaSpecs") or {}).items():
        pod = ((replica or {}).get("template") or {}).get("spec") or {}
        here = prefix + ["spec", "pytorchReplicaSpecs", rtype, "template", "spec"]
        for taint in config.tolerations:
            if not tolerates(pod.get("tolerations") or [], taint):
                yield doc.finding(
                    here + ["tolerations"],
                    f"does not tolerate {taint.get('key')}={taint.get('value', '')}:{taint.get('effect')} "
                    f"from team-config of {namespace} (capacity {config.capacity})",
                )
        selector = pod.get("nodeSelector") or {}
        for key, value in config.pod_node_selector().items():
            if key in selector and selector[key] != value:
                yield doc.finding(here + ["nodeSelector", key],
                                  f"{selector[key]!r} differs from team-config of {namespace}: {value!r}")


def check_namespaces(docs: list[Doc]) -> Iterator[Finding]:
    by_namespace: dict[str, set[str]] = defaultdict(set)
    for d in docs:
        if d.namespace:
            by_namespace[d.namespace].add(d.kind)
    owners = {d.name: ((d.obj.get("spec") or {}).get("owner") or {}).get("name") for d in docs if d.kind == "Profile"}
    pvcs = {(d.namespace, d.name) for d in docs if d.kind == "PersistentVolumeClaim"}
    seen: set[str] = set()
    for d in docs:
        labels = (d.obj.get("metadata") or {}).get("labels") or {}
        if d.kind == "Namespace" and labels.get(TEAM_LABEL) == "true":
            team = d.name
            key, value = PROFILE_LABEL
            if labels.get(key) != value:
                yield d.finding(["metadata", "labels", key], f"must be {value!r} (got {labels.get(key)!r}): Kubeflow's "
                                f"NetworkPolicies admit KFP steps and Katib collectors only from namespaces labelled "
                                f"so, "
                                f"and the profile controller never overwrites an existing key")
            annotation = ((d.obj.get("metadata") or {}).get("annotations") or {}).get("owner")
            if team in owners and annotation != owners[team]:
                yield d.finding(["metadata", "annotations", "owner"],
                                f"must equal the Profile owner {owners[team]!r} "
                                "or the profile controller will not adopt the namespace")
            if TEAM_CONFIG not in {x.name for x in docs if x.kind == "ConfigMap" and x.namespace == team}:
                yield d.finding("(namespace)", f"no ConfigMap {TEAM_CONFIG} in this team namespace")
        elif d.kind == "ConfigMap" and d.name == TEAM_CONFIG and d.namespace:
            team = d.namespace
            parsed, problems = _parse_team_config(d)
            yield from problems
            if parsed is not None and (team, parsed.checkpoint_pvc) not in pvcs:
                # the pipeline's prepare-data, train and register steps mount it whatever checkpointBucket says
                yield d.finding(["data", "checkpointPVC"], f"no PersistentVolumeClaim {parsed.checkpoint_pvc!r} in "
                                f"{team}: the pipeline's steps stage data and models through it")
        else:
            continue
        if team in seen:
            continue
        seen.add(team)
        for kind in ("ResourceQuota", "LimitRange", "NetworkPolicy"):
            if kind not in by_namespace[team]:
                yield d.finding("(namespace)", f"team namespace {team} has no {kind} "
                                "(every team namespace needs a ResourceQuota, a LimitRange and a NetworkPolicy)")
    accounts = {(d.namespace, d.name) for d in docs if d.kind == "ServiceAccount"}
    for d in docs:
        if d.kind == "RoleBinding" and d.namespace in seen:
            for i, subject in enumerate(d.obj.get("subjects") or []):
                key = (subject.get("namespace") or d.namespace, subject.get("name"))
                if (subject.get("kind") == "ServiceAccount" and key not in accounts
                        and not (key[1] in PROFILE_ACCOUNTS and key[0] in owners)):
                    yield d.finding(["subjects", i], f"service account {key[0]}/{key[1]} is neither in this build nor "
                                    f"one the profile controller makes ({', '.join(PROFILE_ACCOUNTS)})")
    for d in docs:
        if d.kind == "ResourceQuota" and d.namespace in seen:
            hard = (d.obj.get("spec") or {}).get("hard") or {}
            for names in QUOTA_KEYS:
                if not any(n in hard for n in names):
                    yield d.finding(["spec", "hard"], f"must limit {' or '.join(names)}")
        if d.kind == "ConfigMap" and d.name == "kueue-manager-config":
            yield from _check_kueue_config(d)


def _check_kueue_config(doc: Doc) -> Iterator[Finding]:
    text = (doc.obj.get("data") or {}).get("controller_manager_config.yaml", "")
    try:
        config = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        yield doc.finding(["data", "controller_manager_config.yaml"], f"not YAML: {error}")
        return
    frameworks = ((config.get("integrations") or {}).get("frameworks")) or []
    if "kubeflow.org/pytorchjob" not in frameworks:
        yield doc.finding(["data", "controller_manager_config.yaml"],
                          "integrations.frameworks must include kubeflow.org/pytorchjob "
                          "(Kueue v0.19 leaves it out by default)")




# GKE injects the GCS FUSE sidecar into pods annotated gke-gcsfuse/volumes: "true". Without these annotations the
# sidecar has no cpu or memory limit, which a ResourceQuota on limits.* refuses; and the sidecar authenticates with
# the pod's service account through Workload Identity, whose bucket roles manifests/gcp grants to default-editor.
GCSFUSE_LIMIT_ANNOTATIONS = ("gke-gcsfuse/cpu-limit", "gke-gcsfuse/memory-limit")


def check_gcsfuse(doc: Doc, job: dict, prefix: list, quota_namespaces: dict[str, dict],
                  profile_namespaces: set[str]) -> Iterator[Finding]:
    """The sidecar's limits where a quota limits limits.*; the Workload Identity account in a Profile's namespace
    (the account manifests/gcp grants bucket roles to; checked where the Profile is in view)."""
    namespace = (job.get("metadata") or {}).get("namespace") or doc.namespace
    hard = quota_namespaces.get(namespace, {})
    for rtype, replica in ((job.get("spec") or {}).get("pytorchReplicaSpecs") or {}).items():
        template = (replica or {}).get("template") or {}
        annotations = (template.get("metadata") or {}).get("annotations") or {}
        if str(annotations.get("gke-gcsfuse/volumes")) != "true":
            continue
        here = prefix + ["spec", "pytorchReplicaSpecs", rtype, "template"]
        if any(key.startswith("limits.") for key in hard):
            for key in GCSFUSE_LIMIT_ANNOTATIONS:
                if key not in annotations:
                    yield doc.finding(here + ["metadata", "annotations", key], f"must be set: the GCS FUSE sidecar "
                                      f"otherwise has no limit, and ResourceQuota of {namespace} limits limits.*")
        account = (template.get("spec") or {}).get("serviceAccountName") or "default"
        if namespace in profile_namespaces and account != WORKLOAD_IDENTITY_ACCOUNT:
            yield doc.finding(here + ["spec", "serviceAccountName"], f"{account!r} has no Workload Identity: the GCS "
                              f"FUSE sidecar needs {WORKLOAD_IDENTITY_ACCOUNT!r}, which manifests/gcp grants the "
                              f"bucket roles")


def check_data_buckets(docs: list[Doc]) -> Iterator[Finding]:
    """A team-config with dataBucket has the claim DATA_CLAIM bound to a read-only GCS FUSE volume of that bucket
    (kustomize/components/data-bucket: static provisioning), which the pipeline's prepare-data and evaluate steps
    mount; a team without one has neither (its pipeline runs the branch without the mount)."""
    volumes = {d.name: d for d in docs if d.kind == "PersistentVolume"}
    claims = {(d.namespace, d.name): d for d in docs if d.kind == "PersistentVolumeClaim"}
    for doc in docs:
        if not (doc.kind == "ConfigMap" and doc.name == TEAM_CONFIG and doc.namespace):
            continue
        team, (config, _) = doc.namespace, _parse_team_config(doc)
        if config is None:
            continue  # reported by check_namespaces
        claim = claims.get((team, DATA_CLAIM))
        if not config.data_bucket:
            if claim is not None:
                yield claim.finding("(root)", f"team-config of {team} sets no dataBucket: drop "
                                    "kustomize/components/data-bucket from the team's overlay, or set dataBucket")
            continue
        if claim is None:
            yield doc.finding(["data", "dataBucket"], f"no PersistentVolumeClaim {DATA_CLAIM!r} in {team}: add "
                              f"kustomize/components/data-bucket to the team's overlay (the pipeline's prepare-data "
                              f"and evaluate steps mount that claim at {DATA_MOUNT})")
            continue
        yield from _check_data_claim(claim, config.data_bucket, volumes)


def _check_data_claim(claim: Doc, bucket: str, volumes: dict[str, Doc]) -> Iterator[Finding]:
    spec = claim.obj.get("spec") or {}
    name = spec.get("volumeName")
    volume = volumes.get(str(name))
    if volume is None:
        yield claim.finding(["spec", "volumeName"], f"{name!r} names no PersistentVolume in this build: the claim "
                            "would bind to whatever its storage class provisions instead of the team's bucket")
        return
    pv = volume.obj.get("spec") or {}
    csi = pv.get("csi") or {}
    ref = pv.get("claimRef") or {}
    if csi.get("driver") != GCSFUSE_DRIVER:
        yield volume.finding(["spec", "csi", "driver"], f"must be {GCSFUSE_DRIVER} (got {csi.get('driver')!r})")
    if csi.get("volumeHandle") != bucket:
        yield volume.finding(["spec", "csi", "volumeHandle"], f"must be the team's dataBucket {bucket!r} (got "
                             f"{csi.get('volumeHandle')!r}): the driver mounts the bucket this names")
    if csi.get("readOnly") is not True:
        yield volume.finding(["spec", "csi", "readOnly"], "must be true: the steps and replicas only read the "
                             "bucket, and kfp-kubernetes cannot mount a claim read-only")
    for doc, modes in ((volume, pv.get("accessModes")), (claim, spec.get("accessModes"))):
        if modes != ["ReadOnlyMany"]:
            yield doc.finding(["spec", "accessModes"], f"must be [ReadOnlyMany] (got {modes!r})")
    if (ref.get("namespace"), ref.get("name")) != (claim.namespace, claim.name):
        yield volume.finding(["spec", "claimRef"], f"must name {claim.namespace}/{claim.name} (got "
                             f"{ref.get('namespace')}/{ref.get('name')}): another namespace's claim could bind it")
    if pv.get("storageClassName") != spec.get("storageClassName") or not spec.get("storageClassName"):
        yield claim.finding(["spec", "storageClassName"], f"must equal the volume's {pv.get('storageClassName')!r} "
                            "and not be empty (empty or absent lets the default StorageClass provision a disk)")


def check_pipeline_bucket_mounts(docs: list[Doc], compiled: Path, label: str) -> Iterator[Finding]:
    """Every step of a compiled pipeline that mounts the data claim carries the GCS FUSE sidecar annotations: without
    gke-gcsfuse/volumes the CSI mount fails ("failed to find the sidecar container in Pod spec"), without the limits
    the sidecar has none, which the team quotas on limits.* refuse. And, where the Kubeflow install is rendered,
    KFP runs those pods as the account the Profile gives Workload Identity."""
    runner = kfp_runner_account(docs)
    documents = [d for d in yaml.safe_load_all(compiled.read_text()) if d]
    platform = (documents[1] if len(documents) > 1 else {}).get("platforms", {}).get("kubernetes", {})
    for executor, config in ((platform.get("deploymentSpec") or {}).get("executors") or {}).items():
        mounts = [m for m in config.get("pvcMount") or []
                  if m.get("mountPath") == DATA_MOUNT or m.get("constant") == DATA_CLAIM
                  or ((m.get("pvcNameParameter") or {}).get("runtimeValue") or {}).get("constant") == DATA_CLAIM]
        if not mounts:
            continue
        doc = Doc(label, {"kind": "KfpExecutorPod", "metadata": {"name": executor}})
        annotations = (config.get("podMetadata") or {}).get("annotations") or {}
        if str(annotations.get("gke-gcsfuse/volumes")) != "true":
            yield doc.finding(["podMetadata", "annotations", "gke-gcsfuse/volumes"], f'must be "true": the step mounts '
                              f"the data bucket claim {DATA_CLAIM!r} at {DATA_MOUNT}, and GKE injects the GCS FUSE "
                              f"sidecar only into pods annotated so")
        for key in GCSFUSE_LIMIT_ANNOTATIONS:
            if key not in annotations:
                yield doc.finding(["podMetadata", "annotations", key], "must be set: the step mounts the data bucket, "
                                  "and without it the GCS FUSE sidecar has no limit, which team quotas on limits.* "
                                  "refuse")
        if runner is not None and runner != WORKLOAD_IDENTITY_ACCOUNT:
            yield doc.finding("(service account)", f"KFP runs the step as {runner!r} "
                              f"(DEFAULTPIPELINERUNNERSERVICEACCOUNT in pipeline-api-server-config), which has no "
                              f"Workload Identity: the GCS FUSE sidecar needs {WORKLOAD_IDENTITY_ACCOUNT!r}")
