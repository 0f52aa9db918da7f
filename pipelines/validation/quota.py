"""Quota arithmetic per team namespace: what its jobs and sweeps ask for against its ResourceQuota.

A ResourceQuota admits pods one at a time (there is no gang admission), so a job or a batch of parallel trials
that does not fit whole starts some replicas, which then hold their GPUs while the rest are refused. Checked:
- every PyTorchJob in the namespace, and the pipeline's training job (team-config per replica, times the
  compiled pipeline's default replica count), fit the quota;
- an Experiment's parallelTrialCount trials fit at once;
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

from pipelines.jobs.team_config import TeamConfig, TeamConfigError
from pipelines.validation.controller_pods import katib_config, suggestion_entry
from pipelines.validation.findings import Doc, Finding
from pipelines.validation.katib import substituted_trial_spec

GPU = "nvidia.com/gpu"
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


def job_usage(job: Mapping) -> Usage:
    total: Usage = Counter()
    for replica in ((job.get("spec") or {}).get("pytorchReplicaSpecs") or {}).values():
        pod = ((replica or {}).get("template") or {}).get("spec") or {}
        replicas = (replica or {}).get("replicas", 1)
        if not isinstance(replicas, int):
            continue  # an unsubstituted or mistyped count: the schema check reports it
        for key, value in pod_usage(pod).items():
            total[key] += value * replicas
    return total


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
                trial = job_usage(substituted_trial_spec(doc) or {})
                parallel = int(spec.get("parallelTrialCount") or 3)  # Katib's default
                sweep = Counter({k: v * parallel for k, v in trial.items()})
                if over := _over(sweep, hard):
                    fits = _fitting(trial, hard)
                    yield doc.finding(["spec", "parallelTrialCount"],
                                      f"{parallel} parallel trials need more than ResourceQuota {quota.name} of "
                                      f"{namespace} holds ({'; '.join(over)}); at most {fits} fit at once")
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


def _fitting(per_trial: Usage, hard: Mapping[str, str]) -> int:
    counts = [int(parse_quantity(str(hard[k])) // v) for k, v in per_trial.items() if k in hard and v > 0]
    return min(counts) if counts else 0


def _check_pipeline_job(doc: Doc, quota: Doc, hard: Mapping, compiled: list[Path]) -> Iterator[Finding]:
    try:
        team = TeamConfig.from_configmap(doc.obj)
    except TeamConfigError:
        return  # reported where team-config is checked
    resources = {"cpu": team.cpu_per_replica, "memory": team.memory_per_replica}
    if team.gpus_per_replica:
        resources[GPU] = str(team.gpus_per_replica)
    per_pod = pod_usage({"containers": [{"resources": {"requests": resources, "limits": resources}}]})
    for path in compiled:
        replicas = pipeline_replicas(path)
        if over := _over(Counter({k: v * replicas for k, v in per_pod.items()}), hard):
            yield doc.finding(["data", "gpusPerReplica"], f"the pipeline's training job ({replicas} replicas, "
                                                          f"{path.name}) needs more than ResourceQuota {quota.name} "
                                                          f"holds: {'; '.join(over)}")


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
