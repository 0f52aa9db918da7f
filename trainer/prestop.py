"""preStop hook: hand the pod's SIGTERM to the trainer when a shell stands between it and the kubelet.

Katib's StdOut metrics collector rewrites a trial's primary container command into
`sh -c "<command> 1>/var/log/katib/metrics.log 2>&1 && echo completed > /var/log/katib/$$.pid"`.
When the pod is deleted (spot preemption, node drain), the kubelet signals only that sh, which as PID 1 without
a handler ignores it, so the trainer would die in the SIGKILL at the grace period's end without checkpointing.
Kubernetes runs a container's preStop hook first, inside the same grace period, so this hook signals the trainer
processes itself and returns as soon as their checkpoint is complete (a new step-N folder with its COMPLETE
marker under the trainer's --out), or once they have exited. It must not wait for the exit alone: the trainer
exits right after its checkpoint, sh (PID 1) with it, the container stops, and a hook still running in it is
killed (exit 137, a FailedPreStopHook event at every preemption; seen in tests/test_image.py's first run). The
kubelet then sends SIGTERM to sh and waits out the rest of the grace period while the trainer exits 143; sh
skips the `&& echo completed` and restartPolicy ExitCode retries the replica.

    lifecycle: {preStop: {exec: {command: [python, -m, trainer.prestop]}}}

Only processes started as `... -m trainer ...` (python or torchrun) are signalled: with Katib's
shareProcessNamespace the collector sidecar's processes are visible too, and must be left alone.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from trainer.checkpoint import complete_checkpoints

PROC = Path("/proc")
POLL_SECONDS = 0.05


def is_trainer_command(argv: list[str]) -> bool:
    """`python -m trainer ...`, `python -u -m trainer ...` (torchrun's workers), `torchrun -m trainer ...`,
    `python -m trainer.torchrun -m trainer ...` (the builder's torchrun)."""
    return any(a == "-m" and b == "trainer" for a, b in zip(argv, argv[1:]))


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a live process, None when it is gone."""
    try:
        fields = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")  # a zombie has already exited


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        stat = _stat(pid)
        if stat is None:
            return False
        pid = stat[1]
    return False


def trainer_pids(under: int | None = None) -> list[int]:
    """Live trainer processes in this PID namespace (only descendants of `under`, when given)."""
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        pid = int(entry.name)
        if is_trainer_command(argv) and _alive(pid) and (under is None or _descends_from(pid, under)):
            found.append(pid)
    return sorted(found)


def checkpoint_root(pid: int) -> Path | None:
    """<--out>/checkpoints of a trainer process (its --out flag, relative to its working directory), if it has one."""
    try:
        argv = (PROC / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
        cwd = Path(os.readlink(PROC / str(pid) / "cwd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    for i, arg in enumerate(argv):
        if arg == "--out" and i + 1 < len(argv):
            return cwd / argv[i + 1] / "checkpoints"
        if arg.startswith("--out="):
            return cwd / arg.split("=", 1)[1] / "checkpoints"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.prestop", description=__doc__.split("\n")[0])
    parser.add_argument("--timeout", type=float, default=25.0,
                        help="seconds to wait for the checkpoint (GKE spot preemption gives about 30)")
    parser.add_argument("--under", type=int, help="only processes below this pid (default: the whole container)")
    args = parser.parse_args(argv)

    pids = trainer_pids(args.under)
    roots = {root for pid in pids if (root := checkpoint_root(pid)) is not None}
    before = {root: set(complete_checkpoints(root)) for root in roots}
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + args.timeout
    saved: list[Path] = []
    while (left := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        saved = [c for root in roots for c in complete_checkpoints(root) if c not in before[root]]
        if saved:
            break
        time.sleep(POLL_SECONDS)
    outcome = (f"checkpoint {saved[-1]} complete" if saved else "all exited" if not left
               else f"still running: {left}")
    print(f"preStop: SIGTERM to trainer pids {pids}; {outcome}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
