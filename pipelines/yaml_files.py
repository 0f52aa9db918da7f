"""Reading a user's YAML file: every document in it, or one line naming the file (and line) that is wrong."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml


def load_documents(path: str | Path, error: Callable[[str], Exception], label: str | None = None) -> list:
    """The non-empty documents of a (possibly multi-document) YAML file. `error` builds the exception raised
    for an unreadable file or invalid YAML; `label` names the file in its message (default: the path)."""
    label = label or str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise error(f"{label}: cannot read ({exc.strerror})") from None
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise error(f"{label}:{where} is not valid YAML") from None
