"""Checkpoints are complete or invisible: a process killed mid-save leaves the previous one usable."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import torch

from trainer import checkpoint


def save(root, step, payload, keep=3):
    checkpoint.begin(root, step)
    checkpoint.save_state(checkpoint.staging_dir(root, step), {"step": step, "payload": payload})
    return checkpoint.commit(root, step, keep)


def test_latest_ignores_staged_and_unmarked_folders(tmp_path):
    save(tmp_path, 10, torch.zeros(3))
    checkpoint.begin(tmp_path, 20)  # a save that never finished
    (tmp_path / "step-00000030").mkdir()  # renamed by hand, no COMPLETE marker
    assert checkpoint.latest(tmp_path).name == "step-00000010"
    assert checkpoint.load_state(checkpoint.latest(tmp_path))["step"] == 10


def test_keeps_only_the_last_k(tmp_path):
    for step in (10, 20, 30, 40):
        save(tmp_path, step, torch.ones(1), keep=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step-00000030", "step-00000040"]
    assert not list(tmp_path.glob(".tmp-step-*"))


def test_sigkill_during_saves_never_corrupts_the_latest(tmp_path):
    """A real process saving ~40 MB checkpoints in a loop, SIGKILLed at several moments."""
    script = textwrap.dedent(f"""
        import torch, sys
        from pathlib import Path
        from trainer import checkpoint
        root = Path({str(tmp_path)!r})
        step = (checkpoint.latest(root) and int(checkpoint.latest(root).name[5:])) or 0
        while True:
            step += 1
            checkpoint.begin(root, step)
            checkpoint.save_state(checkpoint.staging_dir(root, step),
                                  {{"step": step, "payload": torch.full((10_000_000,), float(step))}})
            checkpoint.commit(root, step, keep=2)
            print(step, flush=True)
    """)
    for delay in (0.3, 0.7, 1.1):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one save completed in this round
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        latest = checkpoint.latest(tmp_path)
        state = checkpoint.load_state(latest)
        assert state["step"] == int(latest.name[5:])
        assert torch.equal(state["payload"], torch.full((10_000_000,), float(state["step"])))
