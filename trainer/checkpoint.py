"""Step-N checkpoint folders that are either complete or invisible.

A checkpoint is written into a hidden temporary folder, fsynced, marked COMPLETE, then renamed into
place, so a process killed mid-save (preemption, OOM) leaves the previous checkpoint as the newest
complete one. Only the last `keep` checkpoints stay.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def _fsync_tree(path: Path) -> None:
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under root, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / MARKER).is_file()]
    return [p for _, p in sorted(found)]


def latest(root: Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def staging_dir(root: Path, step: int) -> Path:
    """The temporary folder every rank writes its part of a checkpoint into (shared storage on a cluster)."""
    return root / f".tmp-step-{step:08d}"


def begin(root: Path, step: int) -> Path:
    tmp = staging_dir(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a save that was killed midway
    tmp.mkdir(parents=True)
    return tmp


def commit(root: Path, step: int, keep: int) -> Path:
    """Seal the staged folder and rename it into place; prune old checkpoints and dead staging folders."""
    tmp = staging_dir(root, step)
    (tmp / MARKER).write_text(f"{step}\n")
    _fsync_tree(tmp)
    final = root / f"step-{step:08d}"
    if final.exists():  # the same step saved again after a resume: the new one wins
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def save_state(directory: Path, state: dict) -> None:
    torch.save(state, directory / "state.pt")


def load_state(directory: Path) -> dict:
    return torch.load(directory / "state.pt", map_location="cpu", weights_only=False)
