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

import argparse
import json
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from trainer.files import write_json_atomic, write_text_atomic

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


def local_config(pods_file: Path, out_dir: Path, interval: str = "5s") -> Path:
    """prometheus.yml (and its targets and rules files) in out_dir for the pods of a local run: the team's
    PodMonitoring and Rules, placed in the pods' namespace, at `interval` instead of the cluster's 30 s / 1 m."""
    from pipelines.monitoring import alerts

    pods = json.loads(pods_file.read_text())
    namespace = pods[0]["metadata"].get("namespace", "default") if pods else "default"
    podmonitoring = yaml.safe_load(alerts.PODMONITORING.read_text())
    podmonitoring["metadata"]["namespace"] = namespace
    out_dir.mkdir(parents=True, exist_ok=True)
    targets, rules = out_dir / "targets.json", out_dir / "team-rules.yaml"
    write_json_atomic(targets, file_sd_targets(pods))
    write_text_atomic(rules, yaml.safe_dump(alerts.rule_file(alerts.team_rules())))
    configs = scrape_configs(podmonitoring, str(targets))
    for config in configs:
        config.update(scrape_interval=interval)
    config = {"global": {"scrape_interval": interval, "evaluation_interval": interval},
              "rule_files": [str(rules)], "scrape_configs": configs}
    return write_text_atomic(out_dir / "prometheus.yml", yaml.safe_dump(config, sort_keys=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.monitoring.scrape",
                                     description="A Prometheus config that scrapes a local run's pods as the team's "
                                                 "PodMonitoring would: prometheus --config.file=OUT/prometheus.yml")
    parser.add_argument("pods", type=Path, help="the local runner's pods.json (the train task's pytorchjob/ folder)")
    parser.add_argument("--out", type=Path, default=Path("runs/prometheus"), help="default: runs/prometheus")
    parser.add_argument("--interval", default="5s")
    args = parser.parse_args(argv)
    if not args.pods.is_file():
        print(f"scrape: {args.pods}: no such file (it appears when a local PyTorchJob starts)", file=sys.stderr)
        return 2
    print(local_config(args.pods, args.out, args.interval))
    return 0


if __name__ == "__main__":
    sys.exit(main())
