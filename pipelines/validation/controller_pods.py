"""The pods Kubeflow's controllers build in a team namespace from our objects and the platform's configs,
modelled from the upstream source at our pinned versions, so that Pod Security "restricted" can be checked on
what will really be admitted rather than only on the templates we write.

- KFP 2.16 executor pods (kubeflow/pipelines backend/src/v2/compiler/argocompiler/security_context.go,
  applySecurityContextToExecutorTemplate): the pod gets only seccompProfile RuntimeDefault; the main container
  allowPrivilegeEscalation=false, drop ALL and seccomp, but runAsNonRoot only from the task's kfp-kubernetes
  securityContext or the admin defaults in pipeline-install-config (defaultSecurityContextRunAs*, which win);
  the launcher init container gets the full defaults (defaultContainerSecurityContext).
- KFP driver pods (same file, applySecurityContextToTemplate): the full defaults, pod and container.
- The account KFP runs a pipeline's pods as when the run names none: the API server's
  DEFAULTPIPELINERUNNERSERVICEACCOUNT, which kubeflow/manifests 26.03 sets to default-editor for multi-user
  (applications/pipeline/upstream/base/installs/multi-user/api-service/params.env, the ConfigMap
  pipeline-api-server-config that the ml-pipeline Deployment reads with envFrom).
- Argo's init and wait containers in every workflow pod: the `executor` entry of workflow-controller-configmap
  (argo-workflows workflow/controller/workflowpod.go, newExecContainer).
- Katib v0.19 suggestion Deployment (kubeflow/katib pkg/controller.v1beta1/suggestion/composer/composer.go,
  DesiredDeployment): one container built from the algorithm's katib-config entry, no pod securityContext, the
  suggestion PVC mounted when resumePolicy is FromVolume.
- Katib's injected metrics collector (kubeflow/katib pkg/webhook/v1beta1/pod/inject_webhook.go): a sidecar in the
  trial's primary pod with the primary container's securityContext when katib-config sets
  init.controller.injectSecurityContext, with none otherwise.
- PyTorchJob replicas: the Training Operator copies the replica templates as they are; they are checked where
  they are written (podsecurity.pod_specs).
"""
from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from pipelines.validation.findings import Doc

KUBEFLOW = "kubeflow"
_RUNTIME_DEFAULT = {"type": "RuntimeDefault"}
# defaultContainerSecurityContext in security_context.go
KFP_DEFAULT_CONTAINER = {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
                         "seccompProfile": _RUNTIME_DEFAULT}
# defaultUserContainerSecurityContext: the same without runAsNonRoot, since user images may run as root
KFP_DEFAULT_USER_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                              "seccompProfile": _RUNTIME_DEFAULT}
# pipeline-install-config key -> container securityContext field (backend/src/common/util config wrapper)
KFP_ADMIN_DEFAULTS = {"defaultSecurityContextRunAsUser": "runAsUser", "defaultSecurityContextRunAsGroup": "runAsGroup",
                      "defaultSecurityContextRunAsNonRoot": "runAsNonRoot"}


def _configmap(docs: list[Doc], name: str) -> dict[str, str] | None:
    doc = next((d for d in docs if d.kind == "ConfigMap" and d.name == name and d.namespace == KUBEFLOW), None)
    return dict(doc.obj.get("data") or {}) if doc else None


def _modelled(source: str, kind: str, namespace: str, name: str) -> Doc:
    return Doc(source, {"kind": kind, "metadata": {"namespace": namespace, "name": name}})


def _argo_executor_containers(docs: list[Doc]) -> list[dict]:
    data = _configmap(docs, "workflow-controller-configmap")
    if data is None:
        return []
    executor = yaml.safe_load(data.get("executor") or "") or {}
    security = executor.get("securityContext")
    return [{"name": name, "image": "argoexec", **({"securityContext": security} if security else {})}
            for name in ("init", "wait")]


def kfp_runner_account(docs: list[Doc]) -> str | None:
    """The rendered API server's default runner account, or None when the platform is not among the docs."""
    for doc in docs:
        if doc.kind == "ConfigMap" and doc.namespace == KUBEFLOW and doc.name.startswith("pipeline-api-server-config"):
            account = (doc.obj.get("data") or {}).get("DEFAULTPIPELINERUNNERSERVICEACCOUNT")
            if account:
                return str(account)
    return None


def _kfp_admin_defaults(docs: list[Doc]) -> dict[str, Any]:
    data = _configmap(docs, "pipeline-install-config") or {}
    out: dict[str, Any] = {}
    for key, field in KFP_ADMIN_DEFAULTS.items():
        value = str(data.get(key) or "")
        if value:
            out[field] = value.lower() == "true" if field == "runAsNonRoot" else int(value)
    return out


def kfp_pods(docs: list[Doc], compiled: Path, label: str, namespace: str) -> Iterator[tuple[Doc, dict]]:
    """(modelled Doc, pod spec) for the driver pod and each executor pod of a compiled pipeline."""
    documents = [d for d in yaml.safe_load_all(compiled.read_text()) if d]
    spec = documents[0]
    platform = (documents[1] if len(documents) > 1 else {}).get("platforms", {}).get("kubernetes", {})
    task_configs = (platform.get("deploymentSpec") or {}).get("executors") or {}
    argo = _argo_executor_containers(docs)
    admin = _kfp_admin_defaults(docs)
    driver = {"securityContext": {"runAsNonRoot": True, "seccompProfile": _RUNTIME_DEFAULT},
              "containers": [{"name": "main", "image": "kfp-driver", "securityContext": dict(KFP_DEFAULT_CONTAINER)}],
              "initContainers": copy.deepcopy(argo)}
    yield _modelled(label, "KfpDriverPod", namespace, spec.get("pipelineInfo", {}).get("name", "?")), driver
    for executor in (spec.get("deploymentSpec") or {}).get("executors") or {}:
        security = {**KFP_DEFAULT_USER_CONTAINER,
                    **{k: v for k, v in ((task_configs.get(executor) or {}).get("securityContext") or {}).items()}}
        for key in ("runAsUser", "runAsGroup"):
            if isinstance(security.get(key), str):
                security[key] = int(security[key])
        security.update(admin)
        pod = {"securityContext": {"seccompProfile": _RUNTIME_DEFAULT},
               "initContainers": [{"name": "kfp-launcher", "image": "kfp-launcher",
                                   "securityContext": dict(KFP_DEFAULT_CONTAINER)}, *copy.deepcopy(argo)],
               "containers": [{"name": "main", "image": "step", "securityContext": security}]}
        yield _modelled(label, "KfpExecutorPod", namespace, executor), pod


def katib_config(docs: list[Doc]) -> dict | None:
    """The KatibConfig inside the rendered katib-config ConfigMap; None when the build has none."""
    data = _configmap(docs, "katib-config")
    return None if data is None else (yaml.safe_load(data.get("katib-config.yaml") or "") or {})


def suggestion_entry(config: dict, algorithm: str | None) -> dict | None:
    """The katib-config runtime.suggestions entry Katib uses for `algorithm` (its image, container settings and
    claim spec); None when the config has none."""
    suggestions = (config.get("runtime") or {}).get("suggestions") or []
    return next((s for s in suggestions if s.get("algorithmName") == algorithm), None)


def katib_pods(docs: list[Doc]) -> Iterator[tuple[Doc, dict]]:
    """(modelled Doc, pod spec) for each Experiment's suggestion pod and its trial pod with the injected collector.
    Needs the rendered katib-config; without it nothing is modelled."""
    config = katib_config(docs)
    if config is None:
        return
    inject = bool(((config.get("init") or {}).get("controller") or {}).get("injectSecurityContext"))
    for doc in docs:
        if doc.kind != "Experiment":
            continue
        spec = doc.obj.get("spec") or {}
        algorithm = (spec.get("algorithm") or {}).get("algorithmName")
        entry = suggestion_entry(config, algorithm)
        if entry is not None:
            container = {k: v for k, v in entry.items()
                         if k not in ("algorithmName", "serviceAccountName", "volumeMountPath",
                                      "persistentVolumeClaimSpec", "persistentVolumeSpec", "persistentVolumeLabels")}
            container.setdefault("name", "suggestion")
            pod: dict[str, Any] = {"containers": [container]}
            if spec.get("resumePolicy") == "FromVolume":
                pod["volumes"] = [{"name": "suggestion-volume", "persistentVolumeClaim": {"claimName": "suggestion"}}]
            yield _modelled(doc.source, "KatibSuggestionPod", doc.namespace, doc.name), pod
        trial = ((spec.get("trialTemplate") or {}).get("trialSpec") or {})
        master = (((trial.get("spec") or {}).get("pytorchReplicaSpecs") or {}).get("Master") or {})
        template = copy.deepcopy((master.get("template") or {}).get("spec") or {})
        if not template.get("containers"):
            continue
        collector: dict[str, Any] = {"name": "metrics-logger-and-collector", "image": "katib-metrics-collector"}
        primary = template["containers"][0]
        if inject and primary.get("securityContext"):
            collector["securityContext"] = copy.deepcopy(primary["securityContext"])
        template["containers"].append(collector)
        yield _modelled(doc.source, "KatibTrialPod", doc.namespace, doc.name), template
