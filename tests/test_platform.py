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

import contextlib
import copy
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pipelines.validation import controller_pods, gke, invariants, login, reachability, upstream_changes
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


@contextlib.contextmanager
def _mirrors() -> Iterator[None]:
    """git's url.<base>.insteadOf pointing the remote refs at the pinned mirrors, for this block only."""
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
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def platform() -> tuple[list[Doc], list]:
    with _mirrors():
        loaded, findings = validate([], SchemaSet(crd_dir()), platform=True)
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


def test_login_chain_agrees_on_the_public_dex_issuer(platform) -> None:
    """Dex's issuer is the public URL, its Google connector's callback is that + /callback, oauth2-proxy and the
    dex-jwt RequestAuthentication check tokens against it, and Dex gets every variable its config reads."""
    docs, _ = platform
    issuer = login.dex_issuer(docs)
    assert issuer == "https://kubeflow.example.com/dex"
    assert login.oauth2_proxy_issuer(docs) == issuer
    dex_jwt = _get(docs, "RequestAuthentication", "dex-jwt", "istio-system").obj["spec"]["jwtRules"][0]
    assert (dex_jwt["issuer"], dex_jwt["jwksUri"]) == (issuer, "http://dex.auth.svc.cluster.local:5556/dex/keys")
    env_from = _get(docs, "Deployment", "dex", "auth").obj["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    assert [e["secretRef"]["name"] for e in env_from] == ["dex-oidc-client", "dex-passwords", "dex-google-connector"]
    assert list(login.check_login(docs)) == []


def _edited(docs: list[Doc], kind: str, name: str, edit) -> list[Doc]:
    docs = copy.deepcopy(docs)
    edit(next(d for d in docs if d.kind == kind and (d.name == name or d.name.startswith(name + "-"))).obj)
    return docs


@pytest.mark.parametrize(("kind", "name", "edit", "expected"), [
    ("ConfigMap", "dex", lambda o: o["data"].update({"config.yaml": o["data"]["config.yaml"].replace(
        "issuer: https://kubeflow.example.com/dex", "issuer: http://dex.auth.svc.cluster.local:5556/dex")}),
     ["must be Kubeflow's public https URL", "must be the issuer + /callback", "oauth2-proxy checks ID tokens against",
      "no RequestAuthentication trusts", "differs from Dex's issuer"]),
    ("Deployment", "oauth2-proxy", lambda o: o["spec"]["template"]["spec"]["containers"][0].update(
        env=[e for e in o["spec"]["template"]["spec"]["containers"][0]["env"]
             if e["name"] != login.OAUTH2_PROXY_ISSUER_ENV]),
     ["oauth2-proxy checks ID tokens against 'http://dex.auth.svc.cluster.local:5556/dex'"]),
    # the day-one bug: a strategic-merge patch replaced upstream's envFrom
    ("Deployment", "dex", lambda o: o["spec"]["template"]["spec"]["containers"][0].update(
        envFrom=[{"secretRef": {"name": "dex-google-connector"}}]),
     ["nothing gives Dex $OIDC_CLIENT_ID", "nothing gives Dex $OIDC_CLIENT_SECRET"]),
])
def test_login_check_names_each_broken_link(platform, kind, name, edit, expected) -> None:
    found = [str(f) for f in login.check_login(_edited(platform[0], kind, name, edit))]
    assert len(found) == len(expected) and all(e in f for e, f in zip(expected, found, strict=True)), found


def test_every_upstream_field_our_patches_change_is_declared(platform) -> None:
    docs, findings = platform
    assert not [f for f in findings if f.kind == "UpstreamChanges"]
    declared = upstream_changes.declared(REPO / "manifests" / "kubeflow" / upstream_changes.DECLARATIONS)
    paths = {e["path"] for e in declared if e["object"] == "ConfigMap/auth/dex"}
    assert {'data["config.yaml"].issuer', 'data["config.yaml"].staticPasswords'} <= paths


def test_a_strategic_merge_patch_that_replaces_envfrom_is_refused(tmp_path: Path) -> None:
    """The day-one Dex patch, reintroduced in a copy of manifests/kubeflow/auth: rendered against its upstream
    alone, the replaced and dropped envFrom entries are reported as undeclared changes."""
    auth = tmp_path / "auth"
    shutil.copytree(REPO / "manifests" / "kubeflow" / "auth", auth)
    kustomization = yaml.safe_load((auth / "kustomization.yaml").read_text())
    kustomization["patches"] = [p for p in kustomization["patches"] if "dex-google-connector" not in str(p)]
    kustomization["patches"].append({"patch": yaml.safe_dump({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "dex", "namespace": "auth"},
        "spec": {"template": {"spec": {"containers": [
            {"name": "dex", "envFrom": [{"secretRef": {"name": "dex-google-connector"}}]}]}}}})})
    (auth / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    with _mirrors():
        found = [str(f) for f in upstream_changes.check(
            REPO / "manifests" / "kubeflow" / upstream_changes.DECLARATIONS, "auth",
            upstream_changes.render(auth), upstream_changes.render_upstream(auth)) if f.path == "(undeclared)"]
    assert len(found) == 2, found
    assert "containers[name=dex].envFrom[0].secretRef.name: replaced: upstream \"dex-oidc-client\"" in found[0]
    assert "containers[name=dex].envFrom[1]: removed: upstream {\"secretRef.name\": \"dex-passwords\"}" in found[1]


# Where people are told to run commands: the README, docs/ and the Katib guide.
GUIDES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "katib" / "README.md"]
_NAMESPACE = re.compile(r"(?:kubectl\b[^`\n|]*?\s(?:-n|--namespace)[ =]|KFP_NAMESPACE=)([a-z0-9][a-z0-9-]*)")
_TOKEN = re.compile(r"kubectl\s+-n\s+([a-z0-9][a-z0-9-]*)\s+create\s+token\s+([^\s`]+)")
# Namespaces made by an install that cannot be rendered from the pinned mirrors here.
UNRENDERED = {"kueue-system": "manifests/kueue-install: Kueue's release manifest (network only)",
              "config-control": "Config Controller's own namespace, where manifests/gcp is applied"}


def test_every_account_and_namespace_the_guides_name_exists(platform) -> None:
    """README step 3 once told CI to use a service account `ci` that nothing created: every namespace and every
    `create token` account in the guides must be in the rendered install and overlays (or made by the profile
    controller for a Profile: default-editor, default-viewer)."""
    docs, _ = platform
    namespaces = {d.name for d in docs if d.kind == "Namespace"} | {d.namespace for d in docs if d.namespace}
    accounts = {(d.namespace, d.name) for d in docs if d.kind == "ServiceAccount"}
    accounts |= {(d.name, a) for d in docs if d.kind == "Profile" for a in invariants.PROFILE_ACCOUNTS}
    named, tokens = set(), set()
    for guide in GUIDES:
        text = guide.read_text()
        named |= {(guide.name, n) for n in _NAMESPACE.findall(text)}
        tokens |= {(guide.name, ns, sa) for ns, sa in _TOKEN.findall(text)}
    assert {n for _, n in named} >= {"team-vision", "kubeflow", "auth"}  # the patterns still find what they should
    assert {sa for _, _, sa in tokens} >= {"ci"}
    assert [(g, n) for g, n in sorted(named) if n not in namespaces and n not in UNRENDERED] == []
    assert [(g, ns, sa) for g, ns, sa in sorted(tokens) if (ns, sa) not in accounts] == []


def test_the_control_plane_reaches_every_webhook_of_the_install(platform) -> None:
    """A private cluster's control plane reaches nodes on 443 and 10250 only; the ports Kubeflow's webhooks listen
    on, read from the rendered webhook configurations, Services and Deployments, are what manifests/gcp opens."""
    docs, findings = platform
    ports = gke._webhook_ports(docs)
    assert {4443, 8443, 9443, 15017} <= set(ports)
    assert not [f for f in findings if f.kind == "ContainerCluster"]
    docs = copy.deepcopy(docs)
    rule = _get(docs, "ComputeFirewall", "arrcoc-control-plane-to-webhooks").obj["spec"]["allow"][0]
    rule["ports"] = [p for p in rule["ports"] if p != "15017"]
    (found,) = [str(f) for f in gke.check_cloud(docs) if "firewall" in str(f)]
    assert "15017 (istio-sidecar-injector (istio-system/istiod))" in found and "9443" not in found


def test_browsers_and_ci_reach_the_gateway_over_https_only(platform) -> None:
    """Upstream isolates istio-system to its own pods; behind the load balancer the gateway takes its two serving
    ports from anywhere, nothing else, and the TLS server uses the hand-made certificate Secret."""
    docs, _ = platform
    policies = [d.obj for d in docs if d.kind == "NetworkPolicy"]
    gateway = Endpoint("istio-system", {}, {"app": "istio-ingressgateway", "istio": "ingressgateway"})
    outside = Endpoint(ip="203.0.113.7")
    assert connection(policies, outside, gateway, 8443).allowed and connection(policies, outside, gateway, 8080).allowed
    assert not connection(policies, outside, gateway, 15021).allowed
    without = [p for p in policies if p["metadata"]["name"] != "allow-outside-to-ingressgateway"]
    assert not connection(without, outside, gateway, 8443).allowed  # upstream alone drops every visitor
    assert _get(docs, "Service", "istio-ingressgateway", "istio-system").obj["spec"]["type"] == "LoadBalancer"
    servers = _get(docs, "Gateway", "kubeflow-gateway", "kubeflow").obj["spec"]["servers"]
    assert [s["port"]["number"] for s in servers] == [80, 443]
    assert servers[0]["tls"] == {"httpsRedirect": True}
    assert servers[1]["tls"] == {"mode": "SIMPLE", "credentialName": "kubeflow-tls"}


def test_the_istio_version_the_docs_state_is_the_one_rendered(platform) -> None:
    docs, _ = platform
    images = {c["image"] for d in docs if d.kind == "Deployment"
              for c in d.obj["spec"]["template"]["spec"]["containers"] if "istio-release" in c["image"]}
    versions = {image.rsplit(":", 1)[1] for image in images}
    stated = re.search(r"The Istio it installs is \*\*([\d.]+)\*\*", (REPO / "docs" / "platform.md").read_text())
    assert stated and versions == {stated.group(1)}, (versions, stated)


def test_the_dex_secret_the_docs_create_holds_what_dex_reads() -> None:
    """The keys of the hand-made Secret: what docs/platform.md's command creates, what login.py counts on, and the
    variables Dex's connector reads that no rendered Secret gives (our dex-config.yaml)."""
    text = (REPO / "docs" / "platform.md").read_text()
    command = re.search(r"create secret generic dex-google-connector((?:\s+\\?\s*--from-literal=\w+=\S*)+)", text)
    assert command, "docs/platform.md no longer creates the Secret dex-google-connector"
    documented = set(re.findall(r"--from-literal=(\w+)=", command.group(1)))
    config = yaml.safe_load(yaml.safe_load((REPO / "manifests" / "kubeflow" / "auth" / "dex-config.yaml").read_text())[
        "data"]["config.yaml"])
    read = set(login.env_variables(config["connectors"]))
    assert documented == set(login.HAND_MADE_SECRETS[("auth", "dex-google-connector")]) == read
