"""Atomic file and folder writes: a reader (or a restarted job) sees the old content or the new, never a mix.

Every output the project writes (metrics, datasets, compiled YAML, sweep results, checkpoints' folders) goes
through here, so "nothing half-written" is one piece of code."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def write_atomic(path: str | Path, write: Callable[[IO], None], mode: str = "w") -> Path:
    """Call `write(fh)` on a temporary file beside `path`, fsync it, and rename it over `path`.
    On any error the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda fh: fh.write(text))


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    return write_atomic(path, lambda fh: fh.write(data), mode="wb")


def write_json_atomic(path: str | Path, obj) -> Path:
    def dump(fh):
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")

    return write_atomic(path, dump)


def replace_dir(staged: str | Path, final: str | Path) -> Path:
    """Publish a fully written folder under `final`, replacing what was there: readers see the old folder or
    the new one, never a mix (the old one is renamed aside first, then the new one renamed in)."""
    staged, final = Path(staged), Path(final)
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(staged, final)
        shutil.rmtree(old)
    else:
        os.rename(staged, final)
    return final


def copy_dir_atomic(src: str | Path, dst: str | Path) -> Path:
    """Replace `dst` by a copy of `src`; a reader never sees a half-copied folder."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    return replace_dir(tmp, dst)
