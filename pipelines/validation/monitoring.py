"""Monitoring objects checked against what they watch: a team's PodMonitoring must select the trainer pods the
PyTorchJob builder makes from that team's team-config (and its Katib trial pods) and name a port they declare; the
managed collector (gmp-system) must be let through the NetworkPolicies to that port, and, when the Kubeflow install
is rendered too, to the KFP API server and the Katib controller; every rule of a Rules / ClusterRules object must
parse. PromQL is parsed by promql-parser (a Rust port of Prometheus' parser); where Debian's `promtool` is on
PATH, `promtool check rules` reads the very rule file too, as the rule evaluator would.

Pods are modelled with the labels the Training Operator adds (pipelines/jobs/local.py operator_pod_labels).
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import promql_parser
import yaml

from pipelines.jobs.local import operator_pod_labels
from pipelines.jobs.pytorchjob import build_pytorchjob, pytorch_container, to_manifest
from pipelines.jobs.team_config import TeamConfig
from pipelines.validation import invariants, katib
from pipelines.validation.findings import Doc, Finding
from pipelines.validation.netpol import Endpoint, connection, selector_matches

MONITORING_GROUP = "monitoring.googleapis.com/"
RULE_KINDS = ("Rules", "ClusterRules", "GlobalRules")
# The managed collector: a DaemonSet in gmp-system (prometheus-engine v0.17.2 manifests/operator.yaml).
COLLECTOR = Endpoint("gmp-system", {}, {"app.kubernetes.io/name": "collector"})
# Platform targets of manifests/monitoring and the ports they serve metrics on (kubeflow/manifests 26.03).
PLATFORM_TARGETS = (("KFP API server", {"app": "ml-pipeline"}, 8888),
                    ("Katib controller", {"katib.kubeflow.org/component": "controller"}, 8080))


def _pods(namespace: str, config: TeamConfig, docs: list[Doc]) -> Iterator[tuple[str, dict, dict]]:
    """(what, labels, pytorch container) of each trainer pod kind the team runs: the builder's Master and Worker,
    and the Master of each Katib trial template in the namespace."""
    job = to_manifest(build_pytorchjob("probe", team=config, namespace=namespace, workers=1))
    for rtype, rspec in job["spec"]["pytorchReplicaSpecs"].items():
        labels = {**rspec["template"]["metadata"]["labels"], **operator_pod_labels("probe", rtype, 0)}
        yield f"the builder's {rtype} pod", labels, pytorch_container(rspec)
    for doc in docs:
        if doc.kind == "Experiment" and doc.namespace == namespace:
            trial = katib.substituted_trial_spec(doc) or {}
            master = ((trial.get("spec") or {}).get("pytorchReplicaSpecs") or {}).get("Master")
            if master:
                labels = {**((master.get("template") or {}).get("metadata") or {}).get("labels", {}),
                          **operator_pod_labels("trial", "Master", 0)}
                yield f"Experiment {doc.name}'s trial pod", labels, pytorch_container(master)


def _port(container: dict, wanted) -> int | None:
    for port in container.get("ports") or []:
        if wanted in (port.get("name"), port.get("containerPort")):
            return int(port["containerPort"])
    return None


def check_podmonitorings(docs: list[Doc]) -> Iterator[Finding]:
    configs = invariants.team_configs(docs)
    policies = [d.obj for d in docs if d.kind == "NetworkPolicy"]
    namespace_labels = {d.name: dict((d.obj.get("metadata") or {}).get("labels") or {})
                        for d in docs if d.kind == "Namespace"}
    for doc in docs:
        if doc.kind != "PodMonitoring" or doc.namespace not in configs:
            continue
        spec = doc.obj.get("spec") or {}
        pods = list(_pods(doc.namespace, configs[doc.namespace], docs))
        selected = [(what, labels, c) for what, labels, c in pods if selector_matches(spec.get("selector"), labels)]
        if not selected:
            yield doc.finding(["spec", "selector"], f"matches no trainer pod of {doc.namespace} (the builder's pods "
                                                    f"carry {', '.join(sorted(pods[0][1]))})")
            continue
        for index, endpoint in enumerate(spec.get("endpoints") or []):
            for what, labels, container in selected:
                number = _port(container, endpoint.get("port"))
                if number is None:
                    declared = [p.get("name") or p.get("containerPort") for p in container.get("ports") or []]
                    yield doc.finding(["spec", "endpoints", index, "port"],
                                      f"{endpoint.get('port')!r} is not a port of {what} (it declares {declared})")
                    continue
                if number <= 1024:
                    yield doc.finding(["spec", "endpoints", index, "port"],
                                      f"port {number} needs root to listen on; trainer pods run as non-root under "
                                      f"Pod Security restricted: use a port above 1024")
                pod = Endpoint(doc.namespace, namespace_labels.get(doc.namespace, {}), labels,
                               {p["name"]: p["containerPort"] for p in container.get("ports") or [] if p.get("name")})
                verdict = connection(policies, COLLECTOR, pod, number)
                if not verdict.allowed:
                    yield doc.finding(["spec", "endpoints", index, "port"],
                                      f"the managed collector (gmp-system) cannot reach {what} on port {number}: "
                                      f"refused on {verdict.refused_by} by {', '.join(verdict.policies)}")


def check_platform_scrapes(docs: list[Doc]) -> Iterator[Finding]:
    """Only when the Kubeflow install is among the objects (its NetworkPolicies decide)."""
    kubeflow = next((d for d in docs if d.kind == "Namespace" and d.name == "kubeflow"), None)
    monitors = [d for d in docs if d.kind == "ClusterPodMonitoring"]
    if kubeflow is None or not monitors:
        return
    policies = [d.obj for d in docs if d.kind == "NetworkPolicy"]
    labels = dict((kubeflow.obj.get("metadata") or {}).get("labels") or {})
    for what, pod_labels, port in PLATFORM_TARGETS:
        verdict = connection(policies, COLLECTOR, Endpoint("kubeflow", labels, pod_labels), port)
        if not verdict.allowed:
            yield monitors[0].finding("spec", f"the managed collector (gmp-system) cannot reach the {what} on port "
                                              f"{port}: refused on {verdict.refused_by} by "
                                              f"{', '.join(verdict.policies)}")


def check_rules(docs: list[Doc]) -> Iterator[Finding]:
    rule_docs = [d for d in docs if d.kind in RULE_KINDS and str(d.obj.get("apiVersion", "")).startswith(
        MONITORING_GROUP)]
    for doc in rule_docs:
        for g, group in enumerate((doc.obj.get("spec") or {}).get("groups") or []):
            for r, rule in enumerate(group.get("rules") or []):
                try:
                    promql_parser.parse(str(rule.get("expr", "")))
                except ValueError as error:
                    yield doc.finding(["spec", "groups", g, "rules", r, "expr"], f"does not parse as PromQL: {error}")
        yield from _promtool_check(doc)


def _promtool_check(doc: Doc) -> Iterator[Finding]:
    promtool = shutil.which("promtool")
    if promtool is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{doc.name}.yaml"
        path.write_text(yaml.safe_dump({"groups": (doc.obj.get("spec") or {}).get("groups") or []}))
        result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        problems = [line.strip() for line in (result.stderr + result.stdout).splitlines()
                    if line.strip() and not line.startswith(("Checking", "FAILED:", "  SUCCESS"))]
        yield doc.finding(["spec", "groups"], f"promtool check rules: {'; '.join(problems)[:400]}")


def check_monitoring(docs: list[Doc]) -> Iterator[Finding]:
    yield from check_podmonitorings(docs)
    yield from check_platform_scrapes(docs)
    yield from check_rules(docs)
