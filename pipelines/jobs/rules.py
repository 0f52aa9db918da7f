"""What the Training Operator admits as a PyTorchJob, and which images we run: the one table that the builder
(pipelines/jobs/pytorchjob.py), the local runner and `arrcoc validate` (pipelines/validation/training.py) all read.

The admission rules are those of kubeflow/training-operator v1.9.2, which its CRD schema does not express:
- pkg/webhooks/pytorch/pytorchjob_webhook.go, validatePyTorchJob: metadata.name is a DNS-1035 label;
  validateSpec: with spec.elasticPolicy a Worker replica spec is required, and elasticPolicy.nProcPerNode may
  not be set beside spec.nprocPerNode; validatePyTorchReplicaSpecs: the Master's replicas must be exactly 1 (an
  unset count is refused too: there is no defaulting webhook before it), a Worker's, when set, at least 1.
- pkg/webhooks/utils/utils.go, ValidateReplicaSpecs: replica types are Master and Worker, each template has at
  least one container, every container has an image, and one container is named "pytorch".
- pkg/common/util/webhooks.go, ValidateRunPolicy: runPolicy.managedBy, when set, names a supported controller.
The enums below that the webhook leaves to the controller (restartPolicy, cleanPodPolicy, nprocPerNode) follow
pkg/apis/kubeflow.org/v1 (common_types.go, pytorch_types.go): a value outside them is silently ignored by the
operator, which is worse than a refusal.

Image rule (ours): a tag other than `latest`, or a sha256 digest; a moving tag makes runs unrepeatable.
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

CONTAINER_NAME = "pytorch"
REPLICA_TYPES = ("Master", "Worker")
RESTART_POLICIES = ("Always", "OnFailure", "Never", "ExitCode")
CLEAN_POD_POLICIES = ("All", "Running", "None")
MANAGED_BY = ("kubeflow.org/training-operator", "kueue.x-k8s.io/multikueue")
NPROC_WORDS = ("auto", "cpu", "gpu")
# runPolicy integer fields and their least allowed value (activeDeadlineSeconds: the operator treats 0 as
# "already past the deadline", so a job would fail at once).
RUN_POLICY_MINIMUMS = (("backoffLimit", 0), ("activeDeadlineSeconds", 1), ("ttlSecondsAfterFinished", 0))

DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

Problem = tuple[list, str]  # (path inside the PyTorchJob, one-line message)


def dns1035_problem(name: str) -> str | None:
    if len(name) <= 63 and DNS_1035.fullmatch(name):
        return None
    return f"{name!r} is not a DNS-1035 label (lowercase letters, digits, '-', starting with a letter, at most 63)"


def nproc_problem(value: Any) -> str | None:
    text = str(value)
    if text in NPROC_WORDS or (text.isdigit() and int(text) > 0):
        return None
    return f"{value!r} is not allowed; allowed: {', '.join(NPROC_WORDS)} or a positive integer"


def image_problem(image: str) -> str | None:
    if "@" in image:
        name, digest = image.split("@", 1)
        return None if name and _DIGEST.fullmatch(digest) else f"image {image!r}: the digest must be sha256:<64 hex>"
    last = image.rsplit("/", 1)[-1]
    tag = last.split(":", 1)[1] if ":" in last else ""
    if not tag:
        return f"image {image!r} has no tag: it needs a tag or a digest (a moving default tag makes runs unrepeatable)"
    if tag == "latest":
        return f"image {image!r} uses :latest: pin a version or a digest"
    return None


def pytorchjob_problems(job: Mapping[str, Any]) -> Iterator[Problem]:
    """Every rule above that `job` (a PyTorchJob manifest) breaks, in document order."""
    name = str((job.get("metadata") or {}).get("name") or "")
    # Katib names the trial job itself; its template may leave the name out.
    if name and (problem := dns1035_problem(name)):
        yield ["metadata", "name"], problem
    spec = job.get("spec") or {}
    replicas = spec.get("pytorchReplicaSpecs")
    if not isinstance(replicas, Mapping) or not replicas:
        yield ["spec", "pytorchReplicaSpecs"], "is required (a Master replica spec at least)"
        replicas = {}
    elif "Master" not in replicas:
        yield ["spec", "pytorchReplicaSpecs"], "a Master replica is required"
    elastic = spec.get("elasticPolicy")
    if elastic:
        if "Worker" not in replicas:
            yield ["spec", "pytorchReplicaSpecs", "Worker"], "must be configured if elastic policy is used"
        if elastic.get("nProcPerNode") is not None and spec.get("nprocPerNode") is not None:
            yield ["spec", "elasticPolicy", "nProcPerNode"], "must not be used with spec.nprocPerNode"
    for rtype, replica in replicas.items():
        yield from _replica_problems(rtype, replica)
    run_policy = spec.get("runPolicy") or {}
    clean = run_policy.get("cleanPodPolicy")
    if clean is not None and clean not in CLEAN_POD_POLICIES:
        yield (["spec", "runPolicy", "cleanPodPolicy"],
               f"{clean!r} is not allowed; allowed: {', '.join(CLEAN_POD_POLICIES)}")
    managed_by = run_policy.get("managedBy")
    if managed_by is not None and managed_by not in MANAGED_BY:
        yield ["spec", "runPolicy", "managedBy"], f"{managed_by!r} is not allowed; allowed: {', '.join(MANAGED_BY)}"
    for key, low in RUN_POLICY_MINIMUMS:
        value = run_policy.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            yield ["spec", "runPolicy", key], f"={value!r} must be an integer >= {low}"
    nproc = spec.get("nprocPerNode")
    if nproc is not None and (problem := nproc_problem(nproc)):
        yield ["spec", "nprocPerNode"], problem


def _replica_problems(rtype: str, replica: Any) -> Iterator[Problem]:
    here = ["spec", "pytorchReplicaSpecs", rtype]
    if rtype not in REPLICA_TYPES:
        yield here, f"replica type {rtype!r} is not allowed; allowed: {', '.join(REPLICA_TYPES)}"
        return
    if not isinstance(replica, Mapping):
        yield here, "must be a mapping"
        return
    count = replica.get("replicas")
    if rtype == "Master" and count != 1:
        yield here + ["replicas"], f"Master replicas must be 1, got {count!r}"
    elif count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
        yield here + ["replicas"], f"{rtype} replicas must be an integer >= 1 when set, got {count!r}"
    policy = replica.get("restartPolicy")
    if policy is not None and policy not in RESTART_POLICIES:
        yield here + ["restartPolicy"], f"{policy!r} is not allowed; allowed: {', '.join(RESTART_POLICIES)}"
    containers = (((replica.get("template") or {}).get("spec")) or {}).get("containers") or []
    where = here + ["template", "spec", "containers"]
    if not containers:
        yield where, "at least one container is required"
        return
    if not any(c.get("name") == CONTAINER_NAME for c in containers):
        yield where, f"one container must be named {CONTAINER_NAME!r}"
    for index, container in enumerate(containers):
        if not container.get("image"):
            yield where + [index, "image"], "every container needs an image"
