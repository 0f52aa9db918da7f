"""Whether Kubernetes NetworkPolicies (networking.k8s.io/v1) let one endpoint open a connection to another.

The rules follow https://kubernetes.io/docs/concepts/services-networking/network-policies/ :
- a pod is isolated for ingress (egress) when at least one policy in its namespace selects it and lists
  Ingress (Egress) in policyTypes; policyTypes defaults to Ingress, plus Egress when the policy has egress rules;
- a connection is allowed when the source's egress side allows it AND the destination's ingress side allows it;
  a side that is not isolated allows everything, an isolated side allows what the union of its policies' rules
  allows (policies are additive, order never matters);
- a rule with no `from`/`to` matches every peer, one with no `ports` every port; `ingress: [{}]` allows all;
- a peer with podSelector alone selects pods in the policy's own namespace, namespaceSelector alone every pod in
  the selected namespaces, both in one element the selected pods in the selected namespaces (an AND), and ipBlock
  a CIDR minus its `except` ranges (meant for addresses outside the cluster; pod IPs are not modelled);
- ports match by number or by the destination container's port name, with endPort for ranges; protocol
  defaults to TCP;
- every namespace carries the immutable label kubernetes.io/metadata.name.

A maintained analyzer (network-config-analyzer on PyPI) was considered: it pins PyYAML and networkx to versions
older than the ones this project uses, so this small evaluator is tested against the rules above instead.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

NAME_LABEL = "kubernetes.io/metadata.name"


@dataclass(frozen=True)
class Endpoint:
    """A pod (namespace set) or an address outside the cluster (ip set)."""

    namespace: str = ""
    namespace_labels: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    ports: Mapping[str, int] = field(default_factory=dict)  # named container ports, for named policy ports
    ip: str = ""

    @property
    def is_pod(self) -> bool:
        return bool(self.namespace)

    def all_namespace_labels(self) -> dict[str, str]:
        return {**self.namespace_labels, NAME_LABEL: self.namespace}

    def describe(self) -> str:
        return f"{self.namespace}/{_labels_text(self.labels)}" if self.is_pod else self.ip


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    # "egress" or "ingress": the side that refused, and the policies that isolate it
    refused_by: str = ""
    policies: tuple[str, ...] = ()


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """metav1.LabelSelector semantics: matchLabels and every matchExpression must hold; {} matches all."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, operator, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def policy_types(spec: Mapping[str, Any]) -> list[str]:
    declared = spec.get("policyTypes")
    if declared:
        return list(declared)
    return ["Ingress", "Egress"] if "egress" in spec else ["Ingress"]


def _peer_matches(peer: Mapping[str, Any], policy_namespace: str, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        if other.is_pod:
            return False
        block = peer["ipBlock"] or {}
        address = ipaddress.ip_address(other.ip)
        if address not in ipaddress.ip_network(block.get("cidr", ""), strict=False):
            return False
        return not any(address in ipaddress.ip_network(e, strict=False) for e in block.get("except") or [])
    if not other.is_pod:
        return False
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], other.all_namespace_labels()):
            return False
    elif other.namespace != policy_namespace:
        return False
    return selector_matches(peer.get("podSelector"), other.labels) if "podSelector" in peer else True


def _port_matches(rule_ports: list | None, port: int, protocol: str, destination: Endpoint) -> bool:
    if not rule_ports:
        return True
    for entry in rule_ports:
        if (entry.get("protocol") or "TCP") != protocol:
            continue
        wanted = entry.get("port")
        if wanted is None:
            return True
        if isinstance(wanted, str) and not wanted.isdigit():
            if destination.ports.get(wanted) == port:
                return True
            continue
        low, high = int(wanted), int(entry.get("endPort") or wanted)
        if low <= port <= high:
            return True
    return False


def _side(policies: Iterable[tuple[str, Mapping[str, Any]]], owner: Endpoint, other: Endpoint, direction: str,
          port: int, protocol: str, destination: Endpoint) -> tuple[bool, tuple[str, ...]]:
    """(allowed, names of the policies isolating `owner` in this direction)."""
    if not owner.is_pod:
        return True, ()
    kind, peers_key = ("Ingress", "from") if direction == "ingress" else ("Egress", "to")
    isolating: list[str] = []
    for name, policy in policies:
        meta = policy.get("metadata") or {}
        if meta.get("namespace") != owner.namespace:
            continue
        spec = policy.get("spec") or {}
        if kind not in policy_types(spec) or not selector_matches(spec.get("podSelector"), owner.labels):
            continue
        isolating.append(name)
        for rule in spec.get(direction) or []:
            peers = rule.get(peers_key)
            if peers and not any(_peer_matches(p, owner.namespace, other) for p in peers):
                continue
            if _port_matches(rule.get("ports"), port, protocol, destination):
                return True, tuple(isolating)
    return not isolating, tuple(isolating)


def connection(policies: list[Mapping[str, Any]], source: Endpoint, destination: Endpoint, port: int,
               protocol: str = "TCP") -> Verdict:
    """Whether `source` may connect to `destination` on port/protocol under these NetworkPolicy objects."""
    named = [(f"{(p.get('metadata') or {}).get('namespace')}/{(p.get('metadata') or {}).get('name')}", p)
             for p in policies]
    allowed, isolating = _side(named, source, destination, "egress", port, protocol, destination)
    if not allowed:
        return Verdict(False, "egress", isolating)
    allowed, isolating = _side(named, destination, source, "ingress", port, protocol, destination)
    if not allowed:
        return Verdict(False, "ingress", isolating)
    return Verdict(True)


def _labels_text(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "(any pod)"
