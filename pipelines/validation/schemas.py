"""Schema checks: core kinds with kubernetes-validate (Kubernetes 1.32), custom resources with the
upstream CRD openAPIV3Schema made strict, Katib objects with Katib's swagger.json."""
from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from pipelines.validation.findings import Doc, Finding
from trainer.errors import UserError

KUBERNETES_VERSION = "1.32"
# The CRD files are large; libyaml parses them many times faster than pure-Python PyYAML.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
KATIB_KINDS = {"Experiment", "Trial", "Suggestion"}
# swagger.json refers to core definitions it does not carry; the trial spec is checked on its own.
_KATIB_STUBS = {
    "v1.ObjectMeta": {"type": "object"},
    "v1.ListMeta": {"type": "object"},
    "v1.Time": {"type": "string"},
    "v1.Container": {"type": "object"},
    "v1.HTTPGetAction": {"type": "object"},
    "v1.unstructured.Unstructured": {"type": "object"},
}


class CrdDirError(UserError):
    """The CRD directory is missing or incomplete: a user error."""


def strict(schema: Any) -> Any:
    """Reject unknown fields wherever the schema lists properties and does not preserve unknown fields
    (what kubeconform's openapi2jsonschema does), so a typo'd field fails instead of being pruned."""
    if isinstance(schema, dict):
        out = {key: strict(value) for key, value in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


class SchemaSet:
    """CRDs and the Katib swagger from one directory (ARRCOC_CRD_DIR, or .arrcoc/crds that `make crds` fills)."""

    def __init__(self, crd_dir: Path) -> None:
        if not crd_dir.is_dir():
            raise CrdDirError(
                f"CRD directory {crd_dir} does not exist: set ARRCOC_CRD_DIR or run `make crds`"
            )
        self.crd_dir = crd_dir
        self.crds: dict[tuple[str, str, str], dict] = {}  # (group, version, kind) -> schema
        self.scopes: dict[tuple[str, str], str] = {}  # (group, kind) -> Namespaced | Cluster
        for path in sorted(crd_dir.rglob("*.yaml")):
            for crd in yaml.load_all(path.read_text(), Loader=_LOADER):
                self.add_crd(crd)
        swagger = crd_dir / "katib-v0.19.0" / "swagger.json"
        if not swagger.is_file():
            raise CrdDirError(f"{swagger} is missing: set ARRCOC_CRD_DIR or run `make crds`")
        definitions = json.loads(swagger.read_text())["definitions"]
        self.katib_definitions = strict({**definitions, **_KATIB_STUBS})

    def add_crd(self, crd: Any) -> None:
        """Learn a CustomResourceDefinition (from the CRD directory, or one a rendered install carries itself)."""
        if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
            return
        spec = crd["spec"]
        kind = spec["names"]["kind"]
        self.scopes.setdefault((spec["group"], kind), spec["scope"])
        for version in spec["versions"]:
            if version.get("served", True):
                schema = copy.deepcopy(version.get("schema", {}).get("openAPIV3Schema", {}))
                if "properties" in schema:
                    # The API server accepts these on every object whether or not a CRD's schema lists them
                    # (Istio's CRDs describe only spec and status).
                    for field, kind_of in (("apiVersion", "string"), ("kind", "string"), ("metadata", "object")):
                        schema["properties"].setdefault(field, {"type": kind_of})
                self.crds.setdefault((spec["group"], version["name"], kind), schema)

    @functools.cache  # noqa: B019  (one Schemas per validate run: the cache lives exactly as long as it)
    def _crd_validator(self, key: tuple[str, str, str]) -> jsonschema.protocols.Validator:
        return jsonschema.Draft4Validator(strict(self.crds[key]))

    @functools.cache  # noqa: B019  (one Schemas per validate run: the cache lives exactly as long as it)
    def _katib_validator(self, kind: str) -> jsonschema.protocols.Validator:
        schema = {"definitions": self.katib_definitions, "$ref": f"#/definitions/v1beta1.{kind}"}
        return jsonschema.Draft4Validator(schema)

    def scope(self, api_version: str, kind: str) -> str | None:
        group = api_version.rpartition("/")[0]
        return self.scopes.get((group, kind))

    def check(self, doc: Doc) -> Iterator[Finding]:
        obj = doc.obj
        api_version, kind = str(obj.get("apiVersion", "")), doc.kind
        if not api_version or kind == "?":
            yield doc.finding("(root)", "apiVersion and kind are required")
            return
        group, _, version = api_version.rpartition("/")
        if group == "kubeflow.org" and kind in KATIB_KINDS:
            validator = self._katib_validator(kind)
        elif (group, version, kind) in self.crds:
            validator = self._crd_validator((group, version, kind))
        else:
            yield from _check_core(doc, self)
            return
        for error in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
            yield doc.finding(list(error.absolute_path), error.message)
        if self.scope(api_version, kind) == "Cluster" and doc.namespace:
            yield doc.finding(["metadata", "namespace"], f"{kind} is cluster-scoped: remove the namespace")


def _check_core(doc: Doc, schemas: SchemaSet) -> Iterator[Finding]:
    try:
        kubernetes_validate.validate(copy.deepcopy(doc.obj), KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        yield doc.finding(list(error.path), error.message)
    except kubernetes_validate.SchemaNotFoundError:
        yield doc.finding(
            "apiVersion",
            f"no schema for {doc.obj.get('apiVersion')} {doc.kind}: neither a Kubernetes "
            f"{KUBERNETES_VERSION} kind nor a CRD in {schemas.crd_dir}",
        )
