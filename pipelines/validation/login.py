"""The login chain of the rendered install agrees with itself: Dex's issuer, its connectors' callback, the issuer
oauth2-proxy checks ID tokens against, the RequestAuthentication that verifies them at the gateway, and the
variables Dex's config reads from its container's environment.

What each piece does, at the versions kubeflow/manifests 26.03 runs:
- Dex v2.45.0 builds a connector's callback from its issuer (server/handlers.go, `s.absURL("/callback")`) and the
  Google connector refuses any other redirectURI (connector/google/google.go, LoginURL); connector configs expand
  $VARS from the environment (cmd/dex/config.go, expandEnvInMap), static clients read idEnv/secretEnv
  (cmd/dex/serve.go); the ID tokens it signs carry iss = issuer.
- oauth2-proxy v7.14.3 reads oauth2_proxy.cfg, then OAUTH2_PROXY_* variables over it (pkg/apis/options/load.go).
- Istio accepts a JWT at the gateway only where a RequestAuthentication rule names its issuer.
"""
from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator

import yaml

from pipelines.validation.findings import Doc, Finding

DEX = ("auth", "dex")
OAUTH2_PROXY = ("oauth2-proxy", "oauth2-proxy")
OAUTH2_PROXY_ISSUER_ENV = "OAUTH2_PROXY_OIDC_ISSUER_URL"
# Secrets created by hand on the cluster (never rendered), and the keys docs/platform.md tells people to give them.
HAND_MADE_SECRETS = {("auth", "dex-google-connector"): ("GOOGLE_CLIENT_ID", "GOOGLE_CLIENT_SECRET")}
_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")
# kustomize's generator suffix (a hash of 10 characters from its own alphabet)
_HASHED = re.compile(r"^(.*)-[245-9bcdfghkmt]{10}$")


def _get(docs: list[Doc], kind: str, namespace: str, name: str) -> Doc | None:
    for doc in docs:
        base = _HASHED.match(doc.name)
        if doc.kind == kind and doc.namespace == namespace and name in (doc.name, base and base.group(1)):
            return doc
    return None


def _container(doc: Doc, name: str) -> dict:
    containers = ((((doc.obj.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers")) or []
    return next((c for c in containers if c.get("name") == name), {})


def env_variables(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield from _VAR.findall(value)
    elif isinstance(value, dict):
        for item in value.values():
            yield from env_variables(item)
    elif isinstance(value, list):
        for item in value:
            yield from env_variables(item)


def dex_issuer(docs: list[Doc]) -> str | None:
    config_map = _get(docs, "ConfigMap", *DEX)
    if config_map is None:
        return None
    return (yaml.safe_load((config_map.obj.get("data") or {}).get("config.yaml") or "") or {}).get("issuer")


def oauth2_proxy_issuer(docs: list[Doc]) -> str | None:
    """The issuer oauth2-proxy ends up with: its OAUTH2_PROXY_OIDC_ISSUER_URL value over the config file's."""
    deployment = _get(docs, "Deployment", *OAUTH2_PROXY)
    if deployment is None:
        return None
    for env in _container(deployment, "oauth2-proxy").get("env") or []:
        if env.get("name") == OAUTH2_PROXY_ISSUER_ENV and "value" in env:
            return env["value"]
    config_map = _get(docs, "ConfigMap", "oauth2-proxy", "oauth2-proxy")
    text = ((config_map.obj.get("data") or {}).get("oauth2_proxy.cfg") or "") if config_map else ""
    return tomllib.loads(text).get("oidc_issuer_url")


def check_login(docs: list[Doc]) -> Iterator[Finding]:
    config_map = _get(docs, "ConfigMap", *DEX)
    if config_map is None:
        return  # the install is not among the docs (arrcoc validate without --platform)
    path = ["data", "config.yaml"]
    config = yaml.safe_load((config_map.obj.get("data") or {}).get("config.yaml") or "") or {}
    issuer = str(config.get("issuer") or "")
    if not issuer.startswith("https://"):
        yield config_map.finding(path + ["issuer"], f"{issuer!r} must be Kubeflow's public https URL + /dex: browsers "
                                 "are sent to it, and the login cookies are secure-only")
    for i, connector in enumerate(config.get("connectors") or []):
        redirect = (connector.get("config") or {}).get("redirectURI")
        if redirect is not None and redirect != f"{issuer}/callback":
            yield config_map.finding(path + ["connectors", i, "config", "redirectURI"],
                                     f"{redirect!r} must be the issuer + /callback ({issuer}/callback): Dex sends "
                                     "that callback and the connector refuses any other")
    proxy = oauth2_proxy_issuer(docs)
    if proxy != issuer:
        where = _get(docs, "Deployment", *OAUTH2_PROXY) or config_map
        yield where.finding(["spec", "template", "spec", "containers", "oauth2-proxy", "env", OAUTH2_PROXY_ISSUER_ENV],
                            f"oauth2-proxy checks ID tokens against {proxy!r}, Dex issues them as {issuer!r}")
    rules = [(doc, i, rule) for doc in docs if doc.kind == "RequestAuthentication"
             for i, rule in enumerate((doc.obj.get("spec") or {}).get("jwtRules") or [])]
    if not any(rule.get("issuer") == issuer for _, _, rule in rules):
        yield config_map.finding(path + ["issuer"], f"no RequestAuthentication trusts {issuer!r}: the gateway "
                                 "refuses every token Dex issues")
    for doc, i, rule in rules:
        if (doc.name == "dex-jwt" or "dex.auth.svc" in str(rule.get("jwksUri", ""))) and rule.get("issuer") != issuer:
            yield doc.finding(["spec", "jwtRules", i, "issuer"], f"{rule.get('issuer')!r} differs from Dex's issuer "
                              f"{issuer!r}")
    yield from _check_dex_env(docs, config_map, config)


def _check_dex_env(docs: list[Doc], config_map: Doc, config: dict) -> Iterator[Finding]:
    """Every variable Dex's config reads is given to its container: by env, by a rendered Secret in envFrom, or
    by a hand-made Secret in envFrom whose documented keys hold it."""
    needed = {name for client in config.get("staticClients") or [] for key in ("idEnv", "secretEnv")
              if (name := client.get(key))}
    needed.update(env_variables(config.get("connectors") or []))
    deployment = _get(docs, "Deployment", *DEX)
    if deployment is None:
        return
    container = _container(deployment, "dex")
    given = {e.get("name") for e in container.get("env") or []}
    for ref in container.get("envFrom") or []:
        name = (ref.get("secretRef") or {}).get("name")
        secret = _get(docs, "Secret", DEX[0], str(name))
        if secret is not None:
            given.update((secret.obj.get("data") or {}).keys(), (secret.obj.get("stringData") or {}).keys())
        given.update(HAND_MADE_SECRETS.get((DEX[0], str(name)), ()))
    for name in sorted(needed - given):
        yield deployment.finding(["spec", "template", "spec", "containers", "dex", "envFrom"],
                                 f"nothing gives Dex ${name}, which {config_map.kind}/{config_map.name} reads: an env "
                                 "entry or an envFrom Secret holding it is missing")
