"""The NetworkPolicy evaluator against the semantics in the Kubernetes docs
(https://kubernetes.io/docs/concepts/services-networking/network-policies/), one documented rule per test."""
from __future__ import annotations

from pipelines.validation.netpol import Endpoint, connection, policy_types, selector_matches

A = Endpoint("a", {"team": "blue"}, {"app": "web"}, {"http": 8080})
A_DB = Endpoint("a", {"team": "blue"}, {"app": "db"})
B = Endpoint("b", {"team": "red"}, {"app": "client"})
OUTSIDE = Endpoint(ip="203.0.113.7")


def policy(namespace: str, spec: dict, name: str = "p") -> dict:
    return {"kind": "NetworkPolicy", "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def test_no_policy_means_not_isolated() -> None:
    assert connection([], B, A, 80).allowed


def test_default_deny_ingress_refuses_and_names_the_policy() -> None:
    verdict = connection([policy("a", {"podSelector": {}, "policyTypes": ["Ingress"]}, "deny")], B, A, 80)
    assert (verdict.allowed, verdict.refused_by, verdict.policies) == (False, "ingress", ("a/deny",))


def test_policy_types_default_to_ingress_plus_egress_when_egress_rules_exist() -> None:
    assert policy_types({"podSelector": {}}) == ["Ingress"]
    assert policy_types({"podSelector": {}, "egress": []}) == ["Ingress", "Egress"]


def test_policies_are_additive() -> None:
    deny = policy("a", {"podSelector": {}, "policyTypes": ["Ingress"]}, "deny")
    allow = policy("a", {"podSelector": {"matchLabels": {"app": "web"}},
                         "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "red"}}}]}]}, "allow")
    assert connection([deny, allow], B, A, 80).allowed
    assert not connection([deny, allow], B, A_DB, 80).allowed  # the allow policy does not select app=db


def test_pod_selector_alone_means_the_policys_own_namespace() -> None:
    client = {"podSelector": {"matchLabels": {"app": "client"}}}
    allow = policy("a", {"podSelector": {}, "ingress": [{"from": [client]}]})
    assert not connection([allow], B, A, 80).allowed  # app=client, but in namespace b
    assert connection([allow], Endpoint("a", {}, {"app": "client"}), A, 80).allowed


def test_namespace_and_pod_selector_in_one_element_is_an_and_in_two_elements_an_or() -> None:
    both = {"namespaceSelector": {"matchLabels": {"team": "red"}}, "podSelector": {"matchLabels": {"app": "x"}}}
    assert not connection([policy("a", {"podSelector": {}, "ingress": [{"from": [both]}]})], B, A, 80).allowed
    either = [{"namespaceSelector": {"matchLabels": {"team": "red"}}}, {"podSelector": {"matchLabels": {"app": "x"}}}]
    assert connection([policy("a", {"podSelector": {}, "ingress": [{"from": either}]})], B, A, 80).allowed


def test_namespace_name_label_is_always_present() -> None:
    allow = policy("a", {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {
        "matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["b"]}]}}]}]})
    assert connection([allow], B, A, 80).allowed


def test_ports_numbers_names_ranges_and_protocols() -> None:
    def allow(ports: list) -> list:
        return [policy("a", {"podSelector": {}, "ingress": [{"ports": ports}]})]
    assert connection(allow([{"port": 80}]), B, A, 80).allowed
    assert not connection(allow([{"port": 80}]), B, A, 81).allowed
    assert not connection(allow([{"port": 80, "protocol": "UDP"}]), B, A, 80).allowed
    assert connection(allow([{"port": 8000, "endPort": 9000}]), B, A, 8443).allowed
    assert connection(allow([{"port": "http"}]), B, A, 8080).allowed  # A names 8080 "http"
    assert not connection(allow([{"port": "http"}]), B, A, 80).allowed


def test_egress_side_is_checked_first_and_both_must_allow() -> None:
    deny_egress = policy("b", {"podSelector": {}, "policyTypes": ["Egress"]}, "deny-out")
    verdict = connection([deny_egress], B, A, 80)
    assert (verdict.allowed, verdict.refused_by) == (False, "egress")
    allow_out = policy("b", {"podSelector": {}, "egress": [{"to": [{"namespaceSelector": {}}]}]}, "out")
    deny_in = policy("a", {"podSelector": {}, "policyTypes": ["Ingress"]}, "deny-in")
    assert connection([deny_egress, allow_out], B, A, 80).allowed
    assert connection([deny_egress, allow_out, deny_in], B, A, 80).refused_by == "ingress"


def test_ip_block_with_except_matches_only_addresses_outside_pods() -> None:
    egress = policy("b", {"podSelector": {}, "egress": [{"to": [{"ipBlock": {
        "cidr": "203.0.113.0/24", "except": ["203.0.113.0/29"]}}]}]})
    assert connection([egress], B, Endpoint(ip="203.0.113.9"), 443).allowed
    assert not connection([egress], B, OUTSIDE, 443).allowed  # .7 is in the except range
    assert not connection([egress], B, A, 443).allowed  # an ipBlock never selects a pod here


def test_empty_rule_allows_all_and_missing_rules_allow_none() -> None:
    assert connection([policy("a", {"podSelector": {}, "ingress": [{}]})], B, A, 1).allowed
    assert not connection([policy("a", {"podSelector": {}, "ingress": []})], B, A, 1).allowed


def test_selector_operators() -> None:
    labels = {"tier": "gpu", "spot": "true"}
    assert selector_matches({}, labels)
    assert selector_matches({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["cpu"]}]}, labels)
    assert not selector_matches({"matchExpressions": [{"key": "spot", "operator": "DoesNotExist"}]}, labels)
    assert selector_matches({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["x"]}]}, labels)
    assert not selector_matches({"matchLabels": {"tier": "cpu"}}, labels)
