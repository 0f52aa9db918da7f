"""Training Operator v1.9 webhook rules for PyTorchJob that its CRD schema does not express."""
from __future__ import annotations

import re
from typing import Iterator

from pipelines.validation.findings import Doc, Finding

REPLICA_TYPES = ("Master", "Worker")
RESTART_POLICIES = ("Always", "OnFailure", "Never", "ExitCode")
CLEAN_POD_POLICIES = ("All", "Running", "None")
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_NPROC = re.compile(r"^(auto|cpu|gpu|[1-9][0-9]*)$")


def check_pytorchjob(doc: Doc, job: dict, prefix: list) -> Iterator[Finding]:
    name = str((job.get("metadata") or {}).get("name") or "")
    # Katib names the trial job itself; its template may leave the name out.
    if name and (len(name) > 63 or not _DNS1035.match(name)):
        yield doc.finding(prefix + ["metadata", "name"], f"{name!r} is not a DNS-1035 label (lowercase letters, digits, '-', starting with a letter, at most 63)")
    spec = job.get("spec") or {}
    replicas = spec.get("pytorchReplicaSpecs") or {}
    if "Master" not in replicas:
        yield doc.finding(prefix + ["spec", "pytorchReplicaSpecs"], "a Master replica is required")
    for rtype, replica in replicas.items():
        here = prefix + ["spec", "pytorchReplicaSpecs", rtype]
        if rtype not in REPLICA_TYPES:
            yield doc.finding(here, f"replica type {rtype!r} is not allowed; allowed: {', '.join(REPLICA_TYPES)}")
            continue
        replica = replica or {}
        if rtype == "Master" and replica.get("replicas", 1) != 1:
            yield doc.finding(here + ["replicas"], f"Master replicas must be 1, got {replica.get('replicas')}")
        policy = replica.get("restartPolicy")
        if policy is not None and policy not in RESTART_POLICIES:
            yield doc.finding(here + ["restartPolicy"], f"{policy!r} is not allowed; allowed: {', '.join(RESTART_POLICIES)}")
        pod = ((replica.get("template") or {}).get("spec")) or {}
        containers = pod.get("containers") or []
        if not containers:
            yield doc.finding(here + ["template", "spec", "containers"], "at least one container is required")
        if containers and not any(c.get("name") == "pytorch" for c in containers):
            yield doc.finding(here + ["template", "spec", "containers"], "one container must be named 'pytorch'")
        for index, container in enumerate(containers):
            if not container.get("image"):
                yield doc.finding(here + ["template", "spec", "containers", index, "image"], "every container needs an image")
    clean = (spec.get("runPolicy") or {}).get("cleanPodPolicy")
    if clean is not None and clean not in CLEAN_POD_POLICIES:
        yield doc.finding(prefix + ["spec", "runPolicy", "cleanPodPolicy"], f"{clean!r} is not allowed; allowed: {', '.join(CLEAN_POD_POLICIES)}")
    nproc = spec.get("nprocPerNode")
    if nproc is not None and not _NPROC.match(str(nproc)):
        yield doc.finding(prefix + ["spec", "nprocPerNode"], f"{nproc!r} is not allowed; allowed: auto, cpu, gpu or a positive integer")
