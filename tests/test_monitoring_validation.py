"""`arrcoc validate` on monitoring objects: the real ones pass, and each kind of bad monitoring config is caught
with its field path (a selector that matches no trainer pod, a port the pods do not declare, a collector the
NetworkPolicies refuse, a rule that does not parse, a field the GMP v0.17.2 CRD does not know).

No cluster: objects are rendered with `kubectl kustomize` and checked offline (tests/test_validate.py)."""
from __future__ import annotations

import copy
import shutil

import pytest

from pipelines.validation import monitoring
from pipelines.validation.findings import Doc
from pipelines.validation.loading import Loaded, render
from pipelines.validation.run import REPO, check, crd_dir
from pipelines.validation.schemas import SchemaSet


@pytest.fixture(scope="module")
def schemas() -> SchemaSet:
    return SchemaSet(crd_dir())


@pytest.fixture(scope="module")
def team_vision() -> list[Doc]:
    loaded = Loaded()
    render(REPO / "kustomize" / "overlays" / "team-vision", "team-vision", loaded)
    render(REPO / "katib" / "overlays" / "team-vision", "katib-team-vision", loaded)
    assert not loaded.findings
    return loaded.docs


def edited(docs: list[Doc], kind: str, name: str, edit) -> list[Doc]:
    out = []
    for doc in docs:
        if doc.kind == kind and doc.name == name:
            doc = Doc(doc.source, copy.deepcopy(doc.obj))
            edit(doc.obj)
        out.append(doc)
    return out


def messages(findings) -> list[str]:
    return [f"{f.kind}/{f.name}: {f.path}: {f.message}" for f in findings if not f.warning]


def test_the_team_overlay_and_its_sweep_pass(schemas, team_vision):
    assert messages(check(team_vision, schemas)) == []
    kinds = {d.kind for d in team_vision}
    assert {"PodMonitoring", "Rules", "Experiment"} <= kinds


def test_a_selector_that_matches_no_trainer_pod(schemas, team_vision):
    def edit(obj):
        obj["spec"]["selector"] = {"matchLabels": {"app": "trainer"}}
    found = messages(check(edited(team_vision, "PodMonitoring", "arrcoc-trainer", edit), schemas))
    assert len(found) == 1 and found[0].startswith(
        "PodMonitoring/arrcoc-trainer: spec.selector: matches no trainer pod of team-vision (the builder's pods carry ")


def test_a_port_the_pods_do_not_declare(schemas, team_vision):
    def edit(obj):
        obj["spec"]["endpoints"][0]["port"] = "prometheus"
    found = messages(check(edited(team_vision, "PodMonitoring", "arrcoc-trainer", edit), schemas))
    assert found and all("spec.endpoints[0].port: 'prometheus' is not a port of" in f for f in found)
    assert any("Experiment arrcoc-tensions's trial pod" in f for f in found)  # Katib trials are checked too


def test_a_collector_the_network_policies_refuse(schemas, team_vision):
    docs = [d for d in team_vision if not (d.kind == "NetworkPolicy" and d.name == "allow-gmp-collector-scrape")]
    found = messages(check(docs, schemas))
    assert found and all("the managed collector (gmp-system) cannot reach" in f and "refused on ingress by " in f
                         and "team-vision/default-deny" in f for f in found)


def test_a_rule_that_does_not_parse(schemas, team_vision, monkeypatch):
    monkeypatch.setattr(monitoring.shutil, "which", lambda name: None)  # promql-parser alone, as without promtool
    def edit(obj):
        obj["spec"]["groups"][0]["rules"][1]["expr"] = "time() - max by (run) (arrcoc_checkpoint_last_timestamp_seconds"
    found = messages(check(edited(team_vision, "Rules", "arrcoc-training", edit), schemas))
    assert found == ["Rules/arrcoc-training: spec.groups[0].rules[1].expr: does not parse as PromQL: "
                     "unclosed left parenthesis"]


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool is not installed (Debian: apt-get install prometheus); PromQL is still parsed")
def test_promtool_reads_the_rule_file_where_it_is_installed(schemas, team_vision):
    def edit(obj):  # PromQL fine, the annotation's template not: only promtool reads templates
        obj["spec"]["groups"][0]["rules"][0]["annotations"]["summary"] = "{{ $labels.run"
    found = messages(check(edited(team_vision, "Rules", "arrcoc-training", edit), schemas))
    assert len(found) == 1 and found[0].startswith("Rules/arrcoc-training: spec.groups: promtool check rules: ")
    assert "ArrcocTrainingStalled" in found[0]


def test_a_field_the_crd_does_not_know(schemas, team_vision):
    def edit(obj):
        obj["spec"]["endpoints"][0]["intervall"] = "30s"
    found = messages(check(edited(team_vision, "PodMonitoring", "arrcoc-trainer", edit), schemas))
    assert found == ["PodMonitoring/arrcoc-trainer: spec.endpoints[0]: Additional properties are not allowed "
                     "('intervall' was unexpected)"]


def test_platform_scrapes_need_their_network_policies(schemas):
    loaded = Loaded()
    render(REPO / "manifests" / "monitoring", "manifests/monitoring", loaded)
    kubeflow = Doc("kubeflow", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kubeflow"}})
    # kubeflow/manifests 26.03 isolates both (common/kubeflow-namespace/base/kubeflow/*.yaml)
    upstream = [Doc("kubeflow", {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                                 "metadata": {"name": name, "namespace": "kubeflow"},
                                 "spec": {"podSelector": {"matchLabels": labels}, "policyTypes": ["Ingress"],
                                          "ingress": [{"ports": [{"port": 8443}]}]}})
                for name, labels in (("ml-pipeline", {"app": "ml-pipeline"}),
                                     ("katib-controller", {"katib.kubeflow.org/component": "controller"}))]
    assert messages(check([kubeflow, *upstream, *loaded.docs], schemas)) == []
    without_ours = [d for d in loaded.docs if d.kind != "NetworkPolicy"]
    found = messages(check([kubeflow, *upstream, *without_ours], schemas))
    assert [f.split(": spec: ")[1].split(" on port")[0] for f in found] == [
        "the managed collector (gmp-system) cannot reach the KFP API server",
        "the managed collector (gmp-system) cannot reach the Katib controller"]
