"""The whole platform, rendered from the exact remote refs a user applies, checked with everything we apply.

The Kubeflow install (manifests/kubeflow) refers to kubeflow/manifests and argo-workflows by remote git ref.
With no network, git's url.<base>.insteadOf points those refs at pinned local mirrors (shared/upstream beside the
checkout, where the test machines keep them); a ref that does not exist at the pinned tag fails exactly as it
would for a user with network access. Where that folder is absent these tests are skipped; a user with network
access runs `arrcoc validate --platform`.

On top of the rendered objects: reachability under Kubeflow's NetworkPolicies and ours together, and Pod
Security "restricted" on the pods KFP, Argo and Katib build (pipelines/validation/controller_pods.py cites the
upstream source each model follows).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from pipelines.validation import controller_pods, invariants, reachability
from pipelines.validation.findings import Doc
from pipelines.validation.netpol import Endpoint, connection
from pipelines.validation.podsecurity import check_restricted
from pipelines.validation.run import COMPILED, REPO, crd_dir, validate
from pipelines.validation.schemas import SchemaSet

UPSTREAM = REPO.parent / "shared" / "upstream"
MIRRORS = {"kubeflow-manifests.git": "https://github.com/kubeflow/manifests",
           "argo-workflows.git": "https://github.com/argoproj/argo-workflows"}
PIPELINE = COMPILED / "arrcoc_train.yaml"
BUCKET_PIPELINE = COMPILED / "arrcoc_train_data_bucket.yaml"  # the variant whose steps mount the data bucket


@pytest.fixture(scope="module")
def platform() -> tuple[list[Doc], list]:
    if not UPSTREAM.is_dir():
        pytest.skip(f"{UPSTREAM} (pinned mirrors of the remote refs) is absent: with network access, run "
                    f"`arrcoc validate --platform` instead")
    saved = {k: os.environ.get(k) for k in ("GIT_CONFIG_COUNT", *(f"GIT_CONFIG_{w}_{i}" for w in ("KEY", "VALUE")
                                                                  for i in range(len(MIRRORS))))}
    os.environ["GIT_CONFIG_COUNT"] = str(len(MIRRORS))
    for i, (mirror, url) in enumerate(MIRRORS.items()):
        os.environ[f"GIT_CONFIG_KEY_{i}"] = f"url.file://{UPSTREAM / mirror}.insteadOf"
        os.environ[f"GIT_CONFIG_VALUE_{i}"] = url
    try:
        loaded, findings = validate([], SchemaSet(crd_dir()), platform=True)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return loaded.docs, findings


def _get(docs: list[Doc], kind: str, name: str, namespace: str | None = None) -> Doc:
    return next(d for d in docs
                if d.kind == kind and d.name == name and (namespace is None or d.namespace == namespace))


def test_whole_platform_renders_and_validates(platform) -> None:
    docs, findings = platform
    assert [str(f) for f in findings] == []
    upstream = {(d.kind, d.namespace, d.name) for d in docs if d.source == "manifests/kubeflow"}
    # what the 26.03 paths bring: the issuer, the per-service NetworkPolicies, KFP, Katib, the Training Operator
    assert {("ClusterIssuer", "", "kubeflow-self-signing-issuer"), ("NetworkPolicy", "kubeflow", "ml-pipeline"),
            ("NetworkPolicy", "kubeflow", "katib-db-manager"), ("Deployment", "kubeflow", "ml-pipeline"),
            ("Deployment", "kubeflow", "training-operator"), ("ConfigMap", "kubeflow", "katib-config")} <= upstream


@pytest.mark.parametrize("team", ["team-vision", "team-research"])
def test_team_workloads_reach_kubeflow_and_the_metadata_server(platform, team: str) -> None:
    docs, _ = platform
    policies = [d.obj for d in docs if d.kind == "NetworkPolicy"]
    labels = _get(docs, "Namespace", team).obj["metadata"]["labels"]
    step = Endpoint(team, labels, {"pipelines.kubeflow.org/v2_component": "true"})
    # the pod labels and target ports of the rendered Deployments
    for pod_labels, port in (({"app": "ml-pipeline"}, 8887), ({"component": "metadata-grpc-server"}, 8080),
                             ({"app": "seaweedfs"}, 8333), ({"katib.kubeflow.org/component": "db-manager"}, 6789)):
        assert connection(policies, step, Endpoint("kubeflow", {}, pod_labels), port).allowed, pod_labels
    assert connection(policies, step, Endpoint(ip="169.254.169.254"), 80).allowed
    assert not connection(policies, step, Endpoint(ip="169.254.169.254"), 8080).allowed


def test_cut_off_namespace_is_reported_against_kubeflows_own_policies(platform) -> None:
    """The day-one bug: our labels transformer stamped part-of=arrcoc on the namespace, so Kubeflow's
    NetworkPolicies refused every KFP step and every Katib collector."""
    docs = copy.deepcopy(platform[0])
    _get(docs, "Namespace", "team-vision").obj["metadata"]["labels"]["app.kubernetes.io/part-of"] = "arrcoc"
    findings = [str(f) for f in reachability.check_reachability(docs) if f.namespace == "" and f.name == "team-vision"]
    for service in ("ml-pipeline:8887", "metadata-grpc-service:8080", "seaweedfs:9000", "katib-db-manager:6789"):
        assert any(service in f and "refused on ingress" in f and "metadata.labels" in f for f in findings), findings
    assert not [f for f in reachability.check_reachability(platform[0])]


def test_traffic_meant_to_be_refused_is_refused(platform) -> None:
    docs, _ = platform
    policies = [d.obj for d in docs if d.kind == "NetworkPolicy"]
    vision = Endpoint("team-vision", _get(docs, "Namespace", "team-vision").obj["metadata"]["labels"], {})
    research = Endpoint("team-research", _get(docs, "Namespace", "team-research").obj["metadata"]["labels"], {})
    assert not connection(policies, research, vision, reachability.RENDEZVOUS_PORT).allowed
    mysql = Endpoint("kubeflow", {}, {"app": "mysql"})
    verdict = connection(policies, vision, mysql, 3306)
    assert (verdict.allowed, verdict.refused_by) == (False, "ingress")
    assert not connection(policies, vision, Endpoint(ip="203.0.113.7"), 80).allowed  # only DNS and HTTPS leave


def _restricted(doc: Doc, spec: dict) -> list[str]:
    return [f"{f.path}: {f.message}" for f in check_restricted(doc, [], spec)]


def test_pods_kubeflow_builds_are_admitted_under_restricted(platform) -> None:
    docs, _ = platform
    modelled = [*controller_pods.katib_pods(docs), *controller_pods.kfp_pods(docs, PIPELINE, "p", "team-vision")]
    kinds = {doc.kind for doc, _ in modelled}
    assert {"KatibSuggestionPod", "KatibTrialPod", "KfpDriverPod", "KfpExecutorPod"} <= kinds
    for doc, spec in modelled:
        assert _restricted(doc, spec) == [], doc.kind
    executor = next(spec for doc, spec in modelled if doc.kind == "KfpExecutorPod")
    assert [c["name"] for c in executor["initContainers"]] == ["kfp-launcher", "init", "wait"]


def _katib_config(docs: list[Doc], edit) -> list[Doc]:
    docs = copy.deepcopy(docs)
    config_map = _get(docs, "ConfigMap", "katib-config", "kubeflow")
    config = yaml.safe_load(config_map.obj["data"]["katib-config.yaml"])
    edit(config)
    config_map.obj["data"]["katib-config.yaml"] = yaml.safe_dump(config)
    return docs


def test_katib_pods_without_our_katib_config_are_refused(platform) -> None:
    """katib-config as upstream ships it: no injectSecurityContext, no suggestion securityContext."""
    def upstream(config: dict) -> None:
        config["init"]["controller"].pop("injectSecurityContext")
        for suggestion in config["runtime"]["suggestions"]:
            suggestion.pop("securityContext")
    docs = _katib_config(platform[0], upstream)
    problems = {doc.kind: _restricted(doc, spec) for doc, spec in controller_pods.katib_pods(docs)}
    collector = "containers[1].securityContext.allowPrivilegeEscalation: must be false (Pod Security restricted)"
    assert collector in problems["KatibTrialPod"]
    assert any(p.startswith("containers[0].securityContext.runAsNonRoot") for p in problems["KatibSuggestionPod"])


def test_kfp_step_without_run_as_non_root_is_refused(platform, tmp_path: Path) -> None:
    """What KFP 2.16 builds for a task with no kfp-kubernetes securityContext and no admin default."""
    documents = list(yaml.safe_load_all(PIPELINE.read_text()))
    for executor in documents[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values():
        executor.pop("securityContext", None)
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump_all(documents))
    docs = platform[0]
    problems = [p for doc, spec in controller_pods.kfp_pods(docs, bare, "p", "t") if doc.kind == "KfpExecutorPod"
                for p in _restricted(doc, spec)]
    assert problems and all(p.startswith("containers[0].securityContext.runAsNonRoot") for p in problems)
    # the platform-wide alternative: pipeline-install-config's admin default
    docs = copy.deepcopy(docs)
    install_config = _get(docs, "ConfigMap", "pipeline-install-config", "kubeflow").obj["data"]
    install_config["defaultSecurityContextRunAsNonRoot"] = "true"
    assert not [p for doc, spec in controller_pods.kfp_pods(docs, bare, "p", "t") for p in _restricted(doc, spec)]


def test_argo_executor_containers_follow_the_workflow_controller_config(platform) -> None:
    docs = copy.deepcopy(platform[0])
    argo = _get(docs, "ConfigMap", "workflow-controller-configmap", "kubeflow").obj["data"]
    argo["executor"] = "imagePullPolicy: IfNotPresent\n"
    modelled = controller_pods.kfp_pods(docs, PIPELINE, "p", "t")
    driver = next(spec for doc, spec in modelled if doc.kind == "KfpDriverPod")
    problems = _restricted(Doc("p", {"kind": "KfpDriverPod"}), driver)
    assert any(p.startswith("initContainers[0].securityContext.allowPrivilegeEscalation") for p in problems)


def test_kfp_runs_the_bucket_steps_as_the_workload_identity_account(platform) -> None:
    """KFP multi-user runs a pipeline's pods as default-editor unless a run names another account; the GCS FUSE
    sidecar of the steps that mount the data bucket authenticates as that account."""
    docs, findings = platform
    assert controller_pods.kfp_runner_account(docs) == "default-editor"
    assert not [f for f in findings if f.kind == "KfpExecutorPod"]
    docs = copy.deepcopy(docs)
    config = next(d for d in docs if d.kind == "ConfigMap" and d.name.startswith("pipeline-api-server-config"))
    config.obj["data"]["DEFAULTPIPELINERUNNERSERVICEACCOUNT"] = "pipeline-runner"
    found = [str(f) for f in invariants.check_pipeline_bucket_mounts(docs, BUCKET_PIPELINE, "p")]
    assert sorted(f.split(": ")[1] for f in found) == ["KfpExecutorPod//exec-evaluate",
                                                       "KfpExecutorPod//exec-prepare-data"]
    assert all("'pipeline-runner'" in f and "Workload Identity" in f for f in found)
