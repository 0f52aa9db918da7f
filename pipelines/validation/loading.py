"""What `arrcoc validate` reads: kustomization directories rendered with `kubectl kustomize`,
plain YAML files, and the remote refs of kustomizations that need the network."""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipelines.validation.findings import Doc, Finding
from trainer.errors import UserError

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
_REMOTE = re.compile(r"^(https?://|git@|ssh://|github\.com/|gitlab\.com/)")
# A pinned ref is a version tag (v1.2.3, 26.03) or a full commit; branches and "latest" move.
_PINNED_REF = re.compile(r"^(v?\d+(\.\d+)+([-+.][0-9A-Za-z.-]+)?|[0-9a-f]{40})$")
_URL_VERSION = re.compile(r"/(download|raw|blob)/v?\d+(\.\d+)+/|/v?\d+(\.\d+)+/")


class LoadError(UserError):
    """A path that cannot be validated at all (missing, no kubectl): a user error."""


@dataclass
class Loaded:
    docs: list[Doc] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    targets: int = 0


def kustomization_file(directory: Path) -> Path | None:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            return directory / name
    return None


def is_remote(entry: str) -> bool:
    return bool(_REMOTE.match(entry))


def _entries(kustomization: dict) -> list[str]:
    return [str(e) for key in ("resources", "bases", "components") for e in kustomization.get(key) or []]


def pin_problem(entry: str) -> str | None:
    """Why a remote kustomize entry is not pinned to a fixed version, or None if it is."""
    ref = re.search(r"[?&](ref|version)=([^&]+)", entry)
    if ref:
        value = ref.group(2)
        return (None if _PINNED_REF.match(value)
                else f"ref {value!r} is not a version tag or commit (branches and 'latest' move)")
    if "latest" in entry.split("/"):
        return "'latest' moves: pin a release version"
    if _URL_VERSION.search(entry):
        return None
    return "not pinned: add ?ref=<tag> (kustomize remote) or use a versioned release URL"


def _load_kustomization(directory: Path) -> dict:
    path = kustomization_file(directory)
    return (yaml.safe_load(path.read_text()) or {}) if path else {}


def remote_entries(directory: Path, _seen: set[Path] | None = None) -> list[tuple[Path, str]]:
    """Remote entries of this kustomization and of the local kustomizations it includes."""
    seen = _seen if _seen is not None else set()
    directory = directory.resolve()
    if directory in seen:
        return []
    seen.add(directory)
    found: list[tuple[Path, str]] = []
    for entry in _entries(_load_kustomization(directory)):
        if is_remote(entry):
            found.append((directory, entry))
        elif (directory / entry).is_dir():
            found.extend(remote_entries(directory / entry, seen))
    return found


def render(directory: Path, label: str, out: Loaded) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise LoadError("kubectl is not on PATH: install kubectl v1.32 (it renders kustomizations)")
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=False)
    out.targets += 1
    if result.returncode != 0:
        message = " ".join((result.stderr or result.stdout).split())
        out.findings.append(Finding(label, "Kustomization", "", label, "(build)",
                                    f"kubectl kustomize failed: {message}"))
        return
    _add_yaml(result.stdout, label, out)


def load_file(path: Path, label: str, out: Loaded) -> None:
    out.targets += 1
    _add_yaml(path.read_text(), label, out)


def _add_yaml(text: str, label: str, out: Loaded) -> None:
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as error:
        out.findings.append(Finding(label, "-", "", "-", "(yaml)", " ".join(str(error).split())))
        return
    for index, obj in enumerate(documents):
        if not isinstance(obj, dict):
            out.findings.append(Finding(label, "-", "", f"document {index}", "(root)", "not a mapping"))
            continue
        items = obj.get("items") if str(obj.get("kind", "")).endswith("List") else None
        for item in items if isinstance(items, list) else [obj]:
            out.docs.append(Doc(label, item))


def check_pins(directory: Path, label_of, out: Loaded) -> None:
    for where, entry in remote_entries(directory):
        problem = pin_problem(entry)
        if problem:
            out.findings.append(Finding(label_of(where), "Kustomization", "", label_of(where), "resources",
                                        f"{entry}: {problem}"))


def load_tree(root: Path, label_of, out: Loaded, render_remote: set[Path] = frozenset()) -> None:
    """Every kustomization under root, once each (a kustomization included by another is skipped). Those that
    need the network have their refs checked for pinning, and are rendered too when listed in render_remote
    (with network access, or with git's url.<base>.insteadOf pointing their refs at local mirrors)."""
    dirs = sorted({p.parent for name in KUSTOMIZATION_FILES for p in root.rglob(name)})
    targets, included = [], set()
    for directory in dirs:
        kustomization = _load_kustomization(directory)
        if kustomization.get("kind") == "Component":
            continue
        targets.append(directory)
        included.update((directory / e).resolve() for e in _entries(kustomization) if not is_remote(e))
    for directory in targets:
        if directory.resolve() in included:
            continue
        if remote_entries(directory):
            check_pins(directory, label_of, out)
            if directory.resolve() not in {p.resolve() for p in render_remote}:
                out.targets += 1
                continue
        render(directory, label_of(directory), out)


def load_path(path: Path, label_of, out: Loaded) -> None:
    """One PATH argument: a kustomization directory, a tree of them, or YAML files."""
    if not path.exists():
        raise LoadError(f"{path}: no such file or directory")
    if path.is_file():
        load_file(path, label_of(path), out)
    elif kustomization_file(path):
        if remote_entries(path):
            out.targets += 1
            check_pins(path, label_of, out)
        else:
            render(path, label_of(path), out)
    elif any(path.rglob("kustomization.yaml")):
        load_tree(path, label_of, out)
    else:
        for file in sorted([*path.rglob("*.yaml"), *path.rglob("*.yml")]):
            load_file(file, label_of(file), out)
