"""A Prometheus scrape configuration made from a PodMonitoring, for a Prometheus that is not on a cluster.

The relabeling is the one GKE's managed collector runs for a PodMonitoring (prometheus-engine v0.17.2
pkg/operator/apis/monitoring/v1/pod_config.go PodMonitoring.ScrapeConfigs and common_types.go
relabelingsForSelector): keep the PodMonitoring's namespace, the pods its selector matches and the port it names;
set namespace, job (its name), instance (<pod>:<port name>), the metadata labels and the fromPod labels; drop
pods that Succeeded or Failed. Where the collector discovers pods through the Kubernetes API, this configuration
reads a file of targets (file_sd) carrying the same __meta_kubernetes_* labels Prometheus' pod discovery would
set (discovery/kubernetes/pod.go), made from Pod objects: the local runner's pods.json. The project, location
and cluster labels the collector adds are left out.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

DEFAULT_INTERVAL = "1m"  # the CRD's default for endpoints[].interval
_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")


def sanitize(name: str) -> str:
    """A Kubernetes label key as a Prometheus label name suffix (Prometheus strutil.SanitizeLabelName)."""
    return _UNSAFE.sub("_", name)


def _selector_relabelings(selector: Mapping[str, Any]) -> list[dict[str, Any]]:
    label, present = "__meta_kubernetes_pod_label_", "__meta_kubernetes_pod_labelpresent_"
    rules = [{"action": "keep", "source_labels": [label + sanitize(k)], "regex": v}
             for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = sanitize(expr["key"]), expr["operator"], "|".join(expr.get("values") or [])
        rules.append({"In": {"action": "keep", "source_labels": [label + key], "regex": values},
                      "NotIn": {"action": "drop", "source_labels": [label + key], "regex": values},
                      "Exists": {"action": "keep", "source_labels": [present + key], "regex": "true"},
                      "DoesNotExist": {"action": "drop", "source_labels": [present + key], "regex": "true"}}[op])
    return rules


_METADATA = {"pod": "__meta_kubernetes_pod_name", "container": "__meta_kubernetes_pod_container_name",
             "node": "__meta_kubernetes_pod_node_name"}
_METADATA_DEFAULT = ["container", "pod", "top_level_controller_name", "top_level_controller_type"]


def scrape_configs(podmonitoring: Mapping[str, Any], targets_file: str) -> list[dict[str, Any]]:
    """One scrape config per endpoint of the PodMonitoring, its targets read from `targets_file` (file_sd)."""
    meta, spec = podmonitoring["metadata"], podmonitoring["spec"]
    namespace, name = meta["namespace"], meta["name"]
    base = [{"action": "keep", "source_labels": ["__meta_kubernetes_namespace"], "regex": namespace},
            *_selector_relabelings(spec.get("selector") or {})]
    for key in (spec.get("targetLabels") or {}).get("metadata", _METADATA_DEFAULT):
        if key in _METADATA:  # top_level_controller_*: derived from owner references, which file_sd lacks
            base.append({"action": "replace", "source_labels": [_METADATA[key]], "target_label": key})
    base += [{"action": "replace", "source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
             {"action": "replace", "replacement": name, "target_label": "job"}]
    if spec.get("filterRunning", True):
        base.append({"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)"})
    base.append({"action": "replace", "source_labels": ["__meta_kubernetes_pod_name"],
                 "target_label": "__tmp_instance"})
    configs = []
    for endpoint in spec["endpoints"]:
        port = endpoint["port"]
        rules = list(base)
        if isinstance(port, str) and not port.isdigit():
            port_name = "__meta_kubernetes_pod_container_port_name"
            rules += [{"action": "keep", "source_labels": [port_name], "regex": port},
                      {"action": "replace", "source_labels": ["__tmp_instance", port_name], "regex": "(.+);(.+)",
                       "replacement": "$1:$2", "target_label": "instance"}]
        else:
            rules += [{"action": "labeldrop", "regex": "container"},
                      {"action": "replace", "source_labels": ["__tmp_instance"], "replacement": f"$1:{port}",
                       "target_label": "instance"},
                      {"action": "replace", "source_labels": ["__meta_kubernetes_pod_ip"], "replacement": f"$1:{port}",
                       "target_label": "__address__"}]
        for mapping in (spec.get("targetLabels") or {}).get("fromPod") or []:
            rules.append({"action": "replace", "target_label": mapping.get("to") or mapping["from"],
                          "source_labels": ["__meta_kubernetes_pod_label_" + sanitize(mapping["from"])]})
        config = {"job_name": f"PodMonitoring/{namespace}/{name}/{port}",
                  "scrape_interval": endpoint.get("interval", DEFAULT_INTERVAL),
                  "metrics_path": endpoint.get("path", "/metrics"), "scheme": endpoint.get("scheme", "http"),
                  "file_sd_configs": [{"files": [targets_file]}], "relabel_configs": rules}
        if "timeout" in endpoint:
            config["scrape_timeout"] = endpoint["timeout"]
        configs.append(config)
    return configs


def file_sd_targets(pods: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Target groups with the labels Prometheus' Kubernetes pod discovery gives each declared container port."""
    groups = []
    for pod in pods:
        meta, status = pod["metadata"], pod.get("status") or {}
        common = {"__meta_kubernetes_namespace": meta.get("namespace", "default"),
                  "__meta_kubernetes_pod_name": meta["name"], "__meta_kubernetes_pod_ip": status.get("podIP", ""),
                  "__meta_kubernetes_pod_phase": status.get("phase", "")}
        for key, value in (meta.get("labels") or {}).items():
            common[f"__meta_kubernetes_pod_label_{sanitize(key)}"] = value
            common[f"__meta_kubernetes_pod_labelpresent_{sanitize(key)}"] = "true"
        for container in pod["spec"]["containers"]:
            for port in container.get("ports") or []:
                labels = {**common, "__meta_kubernetes_pod_container_name": container["name"],
                          "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                          "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
                          "__meta_kubernetes_pod_container_port_protocol": port.get("protocol", "TCP")}
                groups.append({"targets": [f"{status.get('podIP', '')}:{port['containerPort']}"], "labels": labels})
    return groups
