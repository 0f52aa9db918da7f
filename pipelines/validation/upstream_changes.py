"""What our kustomizations take away from the upstream objects they patch, against a reviewed list of what they
are meant to take away.

A kustomization with remote refs is rendered twice from the same pinned refs: as it is, and as its upstream
alone (the same remote resources and components, none of our patches, generators, replacements or files). Every
field of an object present in both renders that ours removes, or whose value ours replaces, must be declared in
`upstream-changes.yaml` beside the kustomization, with the reason; additions are free. The usual accident is a
strategic-merge patch on a list without a merge key (Dex's `envFrom`): it replaces upstream's whole list.

How objects and fields are compared: objects by kind, namespace and name, with kustomize's generator hash
suffix taken off (and off every reference to a generated name); lists of objects with a `name` by that name,
other list items by their whole value (so an item that disappears is reported once, as removed); ConfigMap
values that hold a YAML document (Dex's config.yaml, katib-config.yaml) field by field.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipelines.validation.findings import Doc, Finding
from pipelines.validation.loading import _entries, _load_kustomization, is_remote, kustomization_file

DECLARATIONS = "upstream-changes.yaml"  # beside the kustomization it is about
# kustomize's generator suffix: 10 characters of its hash alphabet (api/hasher, encode)
_HASHED = re.compile(r"^(.*)-[245-9bcdfghkmt]{10}$")
# fields that identify an item of a list in the objects we patch (the merge keys, and Katib's and Dex's own)
_KEYS = ("name", "algorithmName", "kind", "key", "mountPath", "containerPort", "email", "id")
_PLAIN = re.compile(r"^[A-Za-z_$][\w$-]*$")


@dataclass(frozen=True)
class Change:
    object: str  # Kind/namespace/name
    path: str
    change: str  # removed | replaced
    upstream: str  # the upstream value, shortened
    ours: str

    def __str__(self) -> str:
        text = f"{self.object}: {self.path}: {self.change}: upstream {self.upstream}"
        return text if self.change == "removed" else f"{text}, ours {self.ours}"


def upstream_only(directory: Path, into: Path) -> Path:
    """A copy of the kustomization tree at `directory` that keeps only its remote resources and components (and
    the local kustomizations it includes, likewise reduced); returns the copy of `directory`."""
    into.mkdir(parents=True, exist_ok=True)
    kustomization = _load_kustomization(directory)
    reduced: dict = {"apiVersion": kustomization.get("apiVersion", "kustomize.config.k8s.io/v1beta1"),
                     "kind": kustomization.get("kind", "Kustomization")}
    for key in ("resources", "components"):
        kept = []
        for entry in map(str, kustomization.get(key) or []):
            if is_remote(entry):
                kept.append(entry)
            elif kustomization_file(directory / entry) and _has_remote(directory / entry):
                upstream_only(directory / entry, into / entry)
                kept.append(entry)
        if kept:
            reduced[key] = kept
    (into / "kustomization.yaml").write_text(yaml.safe_dump(reduced, sort_keys=False))
    return into


def _has_remote(directory: Path) -> bool:
    return any(is_remote(e) or (kustomization_file(directory / e) and _has_remote(directory / e))
               for e in _entries(_load_kustomization(directory)))


def render(directory: Path) -> list[dict]:
    kubectl = shutil.which("kubectl") or "kubectl"
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory} failed: {' '.join(result.stderr.split())}")
    return [d for d in yaml.safe_load_all(result.stdout) if isinstance(d, dict)]


def render_upstream(directory: Path) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="upstream-") as tmp:
        return render(upstream_only(directory, Path(tmp) / "k"))


def _base(name: str) -> str:
    match = _HASHED.match(name)
    return match.group(1) if match else name


def _identity(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind')}/{meta.get('namespace') or ''}/{_base(str(meta.get('name') or ''))}"


def _unhash(value: object, hashed: dict[str, str]) -> object:
    if isinstance(value, dict):
        return {k: _unhash(v, hashed) for k, v in value.items()}
    if isinstance(value, list):
        return [_unhash(v, hashed) for v in value]
    return hashed.get(value, value) if isinstance(value, str) else value


def _document(text: str) -> dict | None:
    if "\n" not in text:
        return None
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _flatten(value: object, path: tuple, out: dict[tuple, object]) -> None:
    if isinstance(value, dict):
        if not value:
            out[path] = value
        for key, item in value.items():
            _flatten(item, path + (str(key),), out)
    elif isinstance(value, list):
        if not value:
            out[path] = value
        for label, item in _items(value):
            if not isinstance(item, (dict, list)):
                out[path + (label,)] = item
            else:
                _flatten(item, path + (label,), out)
    elif isinstance(value, str) and len(path) == 2 and path[0] in ("data", "stringData") \
            and (document := _document(value)) is not None:
        _flatten(document, path, out)
    else:
        out[path] = value


def _items(items: list) -> list[tuple[str, object]]:
    """Each list item with the label it is compared by: for objects, the first of _KEYS that every item has and no
    two share, else the position; for plain values, the value itself."""
    if items and all(isinstance(i, dict) for i in items):
        for key in _KEYS:
            values = [json.dumps(i.get(key), sort_keys=True) for i in items]
            if all(key in i for i in items) and len(set(values)) == len(values):
                return [(f"[{key}={i[key]}]", i) for i in items]
        return [(f"[{index}]", i) for index, i in enumerate(items)]
    return [(f"[{json.dumps(i, sort_keys=True)}]", i) for i in items]


def _short(value: object) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def _pick(flat: dict[tuple, object], prefix: tuple) -> object:
    if prefix in flat:
        return flat[prefix]
    return {_path(p[len(prefix):]): v for p, v in flat.items() if p[:len(prefix)] == prefix}


def changes(upstream: list[dict], patched: list[dict]) -> list[Change]:
    """Fields of objects in both renders that `patched` removes or whose values it replaces."""
    names = {str((o.get("metadata") or {}).get("name")) for o in [*upstream, *patched]}
    hashed = {n: _base(n) for n in names if _base(n) != n}
    ours = {_identity(o): _unhash(o, hashed) for o in patched}
    found = []
    for obj in upstream:
        key = _identity(obj)
        if key not in ours:
            continue
        before: dict[tuple, object] = {}
        after: dict[tuple, object] = {}
        _flatten(_unhash(obj, hashed), (), before)
        _flatten(ours[key], (), after)
        removed: set[tuple] = set()
        for path, value in before.items():
            if path in after:
                if after[path] != value:
                    found.append(Change(key, _path(path), "replaced", _short(value), _short(after[path])))
                continue
            # report the largest part that is gone (a whole list item, not each of its fields)
            gone = next(path[:n] for n in range(1, len(path) + 1)
                        if not any(other[:n] == path[:n] for other in after))
            if gone not in removed:
                removed.add(gone)
                found.append(Change(key, _path(gone), "removed", _short(_pick(before, gone)), ""))
    return found


def _path(parts: tuple) -> str:
    out = ""
    for part in parts:
        if part.startswith("["):  # a list item's selector stays next to the list's name
            out += part
        elif _PLAIN.match(part):
            out += f".{part}" if out else part
        else:
            out += f'["{part}"]'
    return out or "(root)"


def declared(path: Path) -> list[dict]:
    entries = (yaml.safe_load(path.read_text()) or []) if path.is_file() else []
    for entry in entries:
        missing = [k for k in ("object", "path", "change", "why") if not entry.get(k)]
        if missing or entry["change"] not in ("removed", "replaced"):
            raise ValueError(f"{path}: entry {entry!r}: needs object, path, change (removed|replaced) and why")
    return entries


def check(declarations: Path, label: str, patched: list[dict], upstream: list[dict]) -> Iterator[Finding]:
    """A finding per undeclared removal or replacement, and per declaration that matches nothing (stale)."""
    entries = declared(declarations)
    keys = {(e["object"], e["path"], e["change"]) for e in entries}
    found = changes(upstream, patched)
    report = Doc(label, {"kind": "UpstreamChanges", "metadata": {"name": declarations.name}})
    for change in found:
        if (change.object, change.path, change.change) not in keys:
            yield report.finding("(undeclared)", f"{change}: our patches {change.change[:-1]} this upstream field; "
                                 f"declare it in {label} with why, or fix the patch")
    seen = {(c.object, c.path, c.change) for c in found}
    for entry in entries:
        if (entry["object"], entry["path"], entry["change"]) not in seen:
            yield report.finding("(stale)", f"{entry['object']}: {entry['path']}: declared {entry['change']}, but "
                                 "the render no longer does that: remove the entry")
