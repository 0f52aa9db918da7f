"""The connections a team namespace's workloads need, checked under every rendered NetworkPolicy (ours and
Kubeflow's together), and the ones that must stay refused.

Sources are the pods Kubeflow's controllers create in a team namespace, with the labels they carry:
- a KFP step: Argo labels each workflow pod with workflows.argoproj.io/workflow (argo-workflows
  workflow/controller/workflowpod.go) and KFP adds pipelines.kubeflow.org/v2_component (kubeflow/pipelines
  backend/src/v2/compiler/argocompiler/container.go);
- a Katib trial replica, whose injected metrics collector reports to katib-db-manager: the trial template's
  labels plus the Training Operator's training.kubeflow.org/* labels (kubeflow/training-operator
  pkg/controller.v1/common/pod.go).
Destinations are the rendered Services, resolved to their pods' labels and target ports. When the platform is
not rendered (no Kubeflow Services among the objects), only the team's own side is checked.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pipelines.validation.findings import Doc, Finding
from pipelines.validation.netpol import Endpoint, Verdict, connection
from pipelines.validation.podsecurity import pod_specs

TEAM_LABEL = "arrcoc.io/team"
KUBEFLOW = "kubeflow"
# PyTorchJob rendezvous port (the builder's DEFAULT_PORT) and what the trial's collector and the KFP launcher use.
RENDEZVOUS_PORT = 23456
# GKE metadata server: Workload Identity tokens (169.254.169.254:80) and, off Dataplane V2, the GKE metadata
# server's second address the GCS FUSE sidecar uses (169.254.169.252:988).
METADATA_SERVER = (("169.254.169.254", 80), ("169.254.169.252", 988))


@dataclass(frozen=True)
class Need:
    source: str  # "kfp-step" | "trial"
    service: str  # Service name in the kubeflow namespace
    port: int  # Service port
    why: str


NEEDS = (
    Need("kfp-step", "ml-pipeline", 8887, "the KFP driver and launcher report to the API server (gRPC)"),
    Need("kfp-step", "ml-pipeline", 8888, "the KFP launcher reads run state over HTTP"),
    Need("kfp-step", "metadata-grpc-service", 8080, "the KFP launcher records executions in ML Metadata"),
    Need("kfp-step", "seaweedfs", 9000, "KFP artifacts go to the S3 store seaweedfs.kubeflow:9000"),
    Need("trial", "katib-db-manager", 6789, "Katib's metrics collector stores trial metrics"),
)
# Must stay refused: another team's pods, and the databases behind Kubeflow's services.
REFUSED_SERVICES = (("mysql", 3306), ("katib-mysql", 3306))


def _labels(doc: Doc) -> dict[str, str]:
    return dict((doc.obj.get("metadata") or {}).get("labels") or {})


def _workload_pods(docs: list[Doc], namespace: str) -> list[tuple[dict[str, str], dict[str, int], dict]]:
    """(pod labels, named ports, pod spec) of every workload with a pod template in a namespace."""
    out = []
    for doc in docs:
        if doc.namespace != namespace:
            continue
        for path, spec in pod_specs(doc.obj):
            template = doc.obj
            for key in path[:-1]:
                template = template.get(key) if isinstance(template, dict) else {}
            labels = dict(((template or {}).get("metadata") or {}).get("labels") or {})
            ports = {p["name"]: p["containerPort"] for c in spec.get("containers") or [] for p in c.get("ports") or []
                     if p.get("name")}
            out.append((labels, ports, spec))
    return out


def _service_endpoint(docs: list[Doc], namespaces: dict[str, dict], name: str,
                      port: int) -> tuple[Endpoint, int] | None:
    service = next((d for d in docs if d.kind == "Service" and d.namespace == KUBEFLOW and d.name == name), None)
    if service is None:
        return None
    spec = service.obj.get("spec") or {}
    target = next((p.get("targetPort") or p.get("port") for p in spec.get("ports") or [] if p.get("port") == port),
                  None)
    if target is None:
        return None
    selector = spec.get("selector") or {}
    for labels, ports, _ in _workload_pods(docs, KUBEFLOW):
        if selector and all(labels.get(k) == v for k, v in selector.items()):
            number = ports.get(target, target) if isinstance(target, str) else target
            return Endpoint(KUBEFLOW, namespaces.get(KUBEFLOW, {}), labels, ports), int(number)
    return None


def _trial_labels(docs: list[Doc], namespace: str) -> dict[str, str]:
    for doc in docs:
        if doc.kind == "Experiment" and doc.namespace == namespace:
            trial = ((doc.obj.get("spec") or {}).get("trialTemplate") or {}).get("trialSpec") or {}
            master = (((trial.get("spec") or {}).get("pytorchReplicaSpecs") or {}).get("Master") or {})
            return dict(((master.get("template") or {}).get("metadata") or {}).get("labels") or {})
    return {}


def check_reachability(docs: list[Doc]) -> Iterator[Finding]:
    policies = [d.obj for d in docs if d.kind == "NetworkPolicy"]
    namespaces = {d.name: _labels(d) for d in docs if d.kind == "Namespace"}
    teams = [d for d in docs if d.kind == "Namespace" and _labels(d).get(TEAM_LABEL) == "true"]
    for team_doc in teams:
        team, labels = team_doc.name, namespaces[team_doc.name]
        step = Endpoint(team, labels, {"workflows.argoproj.io/workflow": "arrcoc-train",
                                       "pipelines.kubeflow.org/v2_component": "true"})
        trial_labels = {**_trial_labels(docs, team), "training.kubeflow.org/job-name": "trial",
                        "training.kubeflow.org/replica-type": "master"}
        trial = Endpoint(team, labels, trial_labels, {"pytorchjob-port": RENDEZVOUS_PORT})
        worker = Endpoint(team, labels, {**trial_labels, "training.kubeflow.org/replica-type": "worker"})
        sources = {"kfp-step": step, "trial": trial}

        def refuse(verdict: Verdict, what: str) -> Finding:
            where = "metadata.labels" if verdict.refused_by == "ingress" else "(NetworkPolicy egress)"
            return team_doc.finding(where, f"{what} is refused on {verdict.refused_by} "  # noqa: B023  (called in this iteration only)
                                           f"(NetworkPolicies isolating it: {', '.join(verdict.policies)})")

        for need in NEEDS:
            resolved = _service_endpoint(docs, namespaces, need.service, need.port)
            destination, port = resolved or (Endpoint(KUBEFLOW, namespaces.get(KUBEFLOW, {})), need.port)
            verdict = connection(policies, sources[need.source], destination, port)
            if not verdict.allowed:
                yield refuse(verdict, f"{need.source} pod -> {KUBEFLOW}/{need.service}:{need.port} ({need.why})")
        # Trial replicas mount the team's buckets, and so do the pipeline's prepare-data and evaluate steps when the
        # team has a dataBucket: the gcsfuse sidecar in either gets its token from the metadata server.
        for source, pod in (("trial", trial), ("kfp-step", step)):
            for address, port in METADATA_SERVER:
                verdict = connection(policies, pod, Endpoint(ip=address), port)
                if not verdict.allowed:
                    yield refuse(verdict, f"{source} pod -> GKE metadata server {address}:{port} "
                                          "(Workload Identity, GCS FUSE)")
        verdict = connection(policies, worker, trial, RENDEZVOUS_PORT)
        if not verdict.allowed:
            yield refuse(verdict, f"PyTorchJob worker -> master:{RENDEZVOUS_PORT} (rendezvous)")
        for other in teams:
            if other.name != team and connection(policies, Endpoint(other.name, namespaces[other.name], {}),
                                                 trial, RENDEZVOUS_PORT).allowed:
                yield team_doc.finding("(NetworkPolicy ingress)", f"pods of {other.name} can reach this team's "
                                                                  f"trial pods: another team must be refused")
        for service, port in REFUSED_SERVICES:
            resolved = _service_endpoint(docs, namespaces, service, port)
            if resolved and connection(policies, step, *resolved).allowed:
                yield team_doc.finding("(NetworkPolicy egress)", f"kfp-step pod -> {KUBEFLOW}/{service}:{port} is "
                                                                 f"allowed: Kubeflow's databases must be refused")
