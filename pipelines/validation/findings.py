"""One validation error and how it prints: `<file>: <Kind>/<namespace>/<name>: <field.path>: <message>`."""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_PLAIN_KEY = re.compile(r"^[A-Za-z_$][\w$-]*$")


def field_path(parts: Iterable[object]) -> str:
    """Dotted path with [i] for list indices and ["k"] for keys holding dots or slashes (labels)."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.match(str(part)):
            out += f".{part}" if out else str(part)
        else:
            out += f'["{part}"]'
    return out or "(root)"


@dataclass(frozen=True)
class Finding:
    file: str
    kind: str
    namespace: str
    name: str
    path: str
    message: str
    warning: bool = False  # printed, but does not fail validation

    def __str__(self) -> str:
        prefix = "warning: " if self.warning else ""
        return f"{prefix}{self.file}: {self.kind}/{self.namespace}/{self.name}: {self.path}: {self.message}"


@dataclass
class Doc:
    """A rendered or loaded object and the file (or kustomization directory) it came from."""

    source: str
    obj: dict

    @property
    def kind(self) -> str:
        return str(self.obj.get("kind", "?"))

    @property
    def namespace(self) -> str:
        return str((self.obj.get("metadata") or {}).get("namespace") or "")

    @property
    def name(self) -> str:
        return str((self.obj.get("metadata") or {}).get("name") or "?")

    def finding(self, path: Iterable[object] | str, message: str, warning: bool = False) -> Finding:
        text = path if isinstance(path, str) else field_path(path)
        return Finding(self.source, self.kind, self.namespace, self.name, text, message, warning)
