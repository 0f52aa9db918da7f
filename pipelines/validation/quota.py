"""Quota arithmetic per team namespace: what its jobs and sweeps ask for against its ResourceQuota.

A ResourceQuota admits pods one at a time (there is no gang admission), so a job or a batch of parallel trials
that does not fit whole starts some replicas, which then hold their GPUs while the rest are refused. Pods count
with what the platform adds to them: the GCS FUSE sidecar of a pod annotated gke-gcsfuse/volumes (requests equal
the gke-gcsfuse/*-limit annotations: gcs-fuse-csi-driver pkg/webhook/config.go, populateResource; unannotated,
its defaults, cmd/webhook/main.go), Katib's metrics collector in each trial's primary pod and Katib's suggestion
pod per Experiment (resources from katib-config's StdOut collector and algorithm entries, else Katib v0.19's
defaults, pkg/apis/config/v1beta1/defaults.go, setResourceRequirements). Checked:
- every PyTorchJob in the namespace, and the pipeline's training job (the builder's replicas from team-config,
  times the compiled pipeline's default replica count, plus the train step's own pod, which waits while it
  runs), fit the quota;
- an Experiment's parallelTrialCount trials and its suggestion pod fit at once;
- the namespace's claims (checkpoints, the data bucket's, and the one Katib's suggestion controller makes for each
  Experiment with resumePolicy FromVolume) fit requests.storage and persistentvolumeclaims: a claim beyond them is
  refused when applied (for Katib's: the suggestion never starts and the Experiment gets no trials);
- a Kueue ClusterQueue for the namespace never admits more than the quota then lets in: its nominal quota plus
  what it may borrow from its cohort (unbounded when borrowingLimit is unset) stays within the ResourceQuota.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from decimal import Decimal
from pathlib import Path

import yaml
from kubernetes.utils.quantity import parse_quantity

from pipelines.jobs.pytorchjob import build_pytorchjob, to_manifest
from pipelines.jobs.team_config import TeamConfig, TeamConfigError
from pipelines.validation.controller_pods import katib_config, suggestion_entry
from pipelines.validation.findings import Doc, Finding
from pipelines.validation.katib import substituted_trial_spec

GPU = "nvidia.com/gpu"
# The step that launches the PyTorchJob and waits for it (pipelines/kfp_pipeline/pipeline.py)
TRAIN_EXECUTOR = "exec-train"
# where a compiled KFP pipeline keeps an executor's requests and limits (kfp 2.17 compiler)
KFP_RESOURCE_FIELDS = {("requests", "cpu"): "resourceCpuRequest", ("requests", "memory"): "resourceMemoryRequest",
                       ("limits", "cpu"): "resourceCpuLimit", ("limits", "memory"): "resourceMemoryLimit"}
# GCS FUSE sidecar requests without annotations (gcs-fuse-csi-driver cmd/webhook/main.go, sidecar-*-request)
GCSFUSE_DEFAULT_REQUESTS = {"cpu": "250m", "memory": "256Mi"}
# Katib v0.19 pkg/apis/config/v1beta1/defaults.go: what setResourceRequirements fills into a collector's,
# suggestion's or early-stopping entry's resources, field by field, where katib-config leaves them out
KATIB_DEFAULTS = {"requests": {"cpu": "50m", "memory": "10Mi"}, "limits": {"cpu": "500m", "memory": "100Mi"}}
# Katib v0.19 pkg/apis/config/v1beta1/defaults.go DefaultSuggestionVolumeStorage: the suggestion's claim for an
# Experiment with resumePolicy FromVolume, unless its algorithm's katib-config entry sets persistentVolumeClaimSpec.
KATIB_SUGGESTION_STORAGE = "1Gi"
# ResourceQuota key -> (requests or limits, resource); "pods" counts pods.
QUOTA_FIELDS = {
    "requests.cpu": ("requests", "cpu"), "cpu": ("requests", "cpu"),
    "requests.memory": ("requests", "memory"), "memory": ("requests", "memory"),
    "limits.cpu": ("limits", "cpu"), "limits.memory": ("limits", "memory"),
    f"requests.{GPU}": ("requests", GPU), f"limits.{GPU}": ("limits", GPU),
}

Usage = Counter  # quota key -> Decimal


def pod_usage(spec: Mapping) -> Usage:
    """What one pod counts against a quota (regular containers; init containers run before and are not summed)."""
    usage: Usage = Counter({"pods": Decimal(1)})
    for container in spec.get("containers") or []:
        resources = container.get("resources") or {}
        for key, (section, resource) in QUOTA_FIELDS.items():
            value = (resources.get(section) or {}).get(resource)
            if value is None and section == "requests":
                # a request defaults to the limit when only the limit is set
                value = (resources.get("limits") or {}).get(resource)
            if value is not None:
                usage[key] += parse_quantity(str(value))
    return usage


def gcsfuse_sidecar(annotations: Mapping) -> dict | None:
    """The sidecar GKE's webhook adds to a pod annotated gke-gcsfuse/volumes: "true", with the resources it gets."""
    if str(annotations.get("gke-gcsfuse/volumes")) != "true":
        return None
    requests, limits = {}, {}
    for resource in ("cpu", "memory"):
        limit = annotations.get(f"gke-gcsfuse/{resource}-limit")
        request = annotations.get(f"gke-gcsfuse/{resource}-request") or limit or GCSFUSE_DEFAULT_REQUESTS[resource]
        requests[resource] = request
        if limit and str(limit) != "0":
            limits[resource] = limit
    return {"name": "gke-gcsfuse-sidecar", "resources": {"requests": requests, "limits": limits}}


def template_usage(template: Mapping) -> Usage:
    """One pod of a pod template, with the GCS FUSE sidecar it will get."""
    spec = dict(template.get("spec") or {})
    sidecar = gcsfuse_sidecar(((template.get("metadata") or {}).get("annotations")) or {})
    if sidecar:
        spec["containers"] = [*(spec.get("containers") or []), sidecar]
    return pod_usage(spec)


def job_usage(job: Mapping) -> Usage:
    total: Usage = Counter()
    for replica in ((job.get("spec") or {}).get("pytorchReplicaSpecs") or {}).values():
        template = (replica or {}).get("template") or {}
        replicas = (replica or {}).get("replicas", 1)
        if not isinstance(replicas, int):
            continue  # an unsubstituted or mistyped count: the schema check reports it
        for key, value in template_usage(template).items():
            total[key] += value * replicas
    return total


def katib_resources(entry: Mapping | None, key: str = "resources") -> dict:
    """A katib-config entry's resources with Katib's per-field defaults filled in, as Katib fills them."""
    given = (entry or {}).get(key) or {}
    return {section: {**defaults, **(given.get(section) or {})} for section, defaults in KATIB_DEFAULTS.items()}


def collector_usage(docs: list[Doc]) -> Usage:
    """Katib's metrics collector in a trial's primary pod (the StdOut collector our Experiments use): counted as a
    container, not a pod."""
    entries = (katib_config(docs) or {}).get("runtime", {}).get("metricsCollectors") or []
    entry = next((e for e in entries if e.get("kind") == "StdOut"), None)
    usage = pod_usage({"containers": [{"resources": katib_resources(entry, "resources")}]})
    usage["pods"] = Decimal(0)
    return usage


def suggestion_usage(docs: list[Doc], spec: Mapping) -> Usage:
    """The suggestion pod Katib runs for an Experiment, in its namespace (plus the early-stopping container)."""
    config = katib_config(docs) or {}
    algorithm = (spec.get("algorithm") or {}).get("algorithmName")
    containers = [{"resources": katib_resources(suggestion_entry(config, algorithm))}]
    stopping = (spec.get("earlyStopping") or {}).get("algorithmName")
    if stopping:
        entries = (config.get("runtime") or {}).get("earlyStoppings") or []
        entry = next((e for e in entries if e.get("algorithmName") == stopping), None)
        containers.append({"resources": katib_resources(entry, "resources")})
    return pod_usage({"containers": containers})


def _over(usage: Usage, hard: Mapping[str, str]) -> list[str]:
    out = []
    for key, limit in hard.items():
        if key in usage and usage[key] > parse_quantity(str(limit)):
            out.append(f"{key} {_fmt(usage[key])} > {limit}")
    return out


def _fmt(value: Decimal) -> str:
    return str(value.normalize()) if value < 1024 else f"{value / 2**30:.0f}Gi"


def pipeline_replicas(compiled: Path) -> int:
    """Master plus the compiled pipeline's default number of workers."""
    spec = next(d for d in yaml.safe_load_all(compiled.read_text()) if d)
    parameters = ((spec.get("root") or {}).get("inputDefinitions") or {}).get("parameters") or {}
    return 1 + int((parameters.get("workers") or {}).get("defaultValue", 1))


def check_quotas(docs: list[Doc], compiled: list[Path] = ()) -> Iterator[Finding]:
    quotas = {d.namespace: d for d in docs if d.kind == "ResourceQuota" and d.namespace}
    for namespace, quota in quotas.items():
        hard = (quota.obj.get("spec") or {}).get("hard") or {}
        for doc in docs:
            if doc.namespace != namespace:
                continue
            if doc.kind == "PyTorchJob" and (over := _over(job_usage(doc.obj), hard)):
                yield doc.finding(["spec", "pytorchReplicaSpecs"], f"needs more than ResourceQuota {quota.name} "
                                                                   f"of {namespace} holds: {'; '.join(over)}")
            elif doc.kind == "Experiment":
                spec = doc.obj.get("spec") or {}
                trial = job_usage(substituted_trial_spec(doc) or {}) + collector_usage(docs)
                suggestion = suggestion_usage(docs, spec)
                parallel = int(spec.get("parallelTrialCount") or 3)  # Katib's default
                sweep = Counter({k: v * parallel for k, v in trial.items()}) + suggestion
                if over := _over(sweep, hard):
                    fits = _fitting(trial, hard, suggestion)
                    yield doc.finding(["spec", "parallelTrialCount"],
                                      f"{parallel} parallel trials and the suggestion pod need more than "
                                      f"ResourceQuota {quota.name} of {namespace} holds ({'; '.join(over)}); at most "
                                      f"{fits} trials fit at once")
            elif doc.kind == "ConfigMap" and doc.name == "team-config":
                yield from _check_pipeline_job(doc, quota, hard, compiled)
        yield from _check_claims(docs, namespace, quota, hard)
        yield from _check_kueue(docs, namespace, quota, hard)


def _check_claims(docs: list[Doc], namespace: str, quota: Doc, hard: Mapping) -> Iterator[Finding]:
    claims = {d.name: _storage(d.obj.get("spec") or {})
              for d in docs if d.kind == "PersistentVolumeClaim" and d.namespace == namespace}
    claims.update(_katib_suggestion_claims(docs, namespace))
    usage: Usage = Counter({"persistentvolumeclaims": Decimal(len(claims)),
                            "requests.storage": sum(claims.values(), Decimal(0))})
    if over := _over(usage, hard):
        yield quota.finding(["spec", "hard"], f"the claims of {namespace} ({', '.join(claims)}) need "
                                              f"more than it holds: {'; '.join(over)}")


def _storage(claim_spec: Mapping) -> Decimal:
    return parse_quantity(str(((claim_spec.get("resources") or {}).get("requests") or {}).get("storage") or 0))


def _katib_suggestion_claims(docs: list[Doc], namespace: str) -> dict[str, Decimal]:
    """The claim Katib's suggestion controller creates for each Experiment that resumes FromVolume.

    Named as Katib names it (util.GetSuggestionPersistentVolumeClaimName: <suggestion>-<algorithm>; the
    Suggestion has the Experiment's name), sized by the algorithm's katib-config entry when the build holds
    katib-config, else Katib's default.
    """
    config = katib_config(docs) or {}
    claims = {}
    for doc in docs:
        spec = doc.obj.get("spec") or {}
        if doc.kind != "Experiment" or doc.namespace != namespace or spec.get("resumePolicy") != "FromVolume":
            continue
        algorithm = (spec.get("algorithm") or {}).get("algorithmName") or ""
        claim_spec = (suggestion_entry(config, algorithm) or {}).get("persistentVolumeClaimSpec") or {}
        claims[f"{doc.name}-{algorithm}"] = _storage(claim_spec) or parse_quantity(KATIB_SUGGESTION_STORAGE)
    return claims


def _fitting(per_trial: Usage, hard: Mapping[str, str], beside: Usage) -> int:
    counts = [int((parse_quantity(str(hard[k])) - beside[k]) // v) for k, v in per_trial.items() if k in hard and v > 0]
    return max(min(counts), 0) if counts else 0


def _check_pipeline_job(doc: Doc, quota: Doc, hard: Mapping, compiled: list[Path]) -> Iterator[Finding]:
    try:
        team = TeamConfig.from_configmap(doc.obj)
    except TeamConfigError:
        return  # reported where team-config is checked
    for path in compiled:
        replicas = pipeline_replicas(path)
        job = to_manifest(build_pytorchjob("quota", team=team, workers=replicas - 1))
        usage = job_usage(job) + _step_usage(path, TRAIN_EXECUTOR)
        if over := _over(usage, hard):
            yield doc.finding(["data", "gpusPerReplica"], f"the pipeline's training job ({replicas} replicas and the "
                                                          f"train step, {path.name}) needs more than ResourceQuota "
                                                          f"{quota.name} holds: {'; '.join(over)}")


def _step_usage(compiled: Path, executor: str) -> Usage:
    """One KFP step's pod, from the compiled pipeline's resources for that executor."""
    spec = next(d for d in yaml.safe_load_all(compiled.read_text()) if d)
    container = (((spec.get("deploymentSpec") or {}).get("executors") or {}).get(executor) or {}).get("container") or {}
    given = container.get("resources") or {}
    resources: dict[str, dict] = {"requests": {}, "limits": {}}
    for (section, resource), field in KFP_RESOURCE_FIELDS.items():
        if field in given:
            resources[section][resource] = given[field]
    return pod_usage({"containers": [{"resources": resources}]})


def _check_kueue(docs: list[Doc], namespace: str, quota: Doc, hard: Mapping) -> Iterator[Finding]:
    for doc in docs:
        if doc.kind != "ClusterQueue":
            continue
        spec = doc.obj.get("spec") or {}
        selector = (spec.get("namespaceSelector") or {}).get("matchLabels") or {}
        if selector.get("kubernetes.io/metadata.name") != namespace:
            continue
        admits: Counter = Counter()
        unbounded: set[str] = set()
        for group in spec.get("resourceGroups") or []:
            for flavor in group.get("flavors") or []:
                for resource in flavor.get("resources") or []:
                    name = resource.get("name")
                    admits[name] += parse_quantity(str(resource.get("nominalQuota", 0)))
                    if spec.get("cohortName") and "borrowingLimit" not in resource:
                        unbounded.add(name)
                    admits[name] += parse_quantity(str(resource.get("borrowingLimit", 0)))
        for name in sorted(admits):
            key = f"requests.{name}"
            limit = hard.get(key, hard.get(name))
            if limit is None:
                continue
            if name in unbounded:
                yield doc.finding(["spec", "resourceGroups"], f"{name}: borrowing from cohort "
                                  f"{spec.get('cohortName')} is unbounded (no borrowingLimit), so Kueue can admit "
                                  f"jobs that ResourceQuota {namespace}/{quota.name} ({key} {limit}) then refuses")
            elif admits[name] > parse_quantity(str(limit)):
                yield doc.finding(["spec", "resourceGroups"], f"{name}: nominalQuota plus borrowingLimit "
                                  f"{_fmt(admits[name])} exceeds ResourceQuota {namespace}/{quota.name} "
                                  f"({key} {limit}): Kueue would admit jobs whose pods the quota refuses")
