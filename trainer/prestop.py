"""preStop hook: hand the pod's SIGTERM to the trainer when a shell stands between it and the kubelet.

Katib's StdOut metrics collector rewrites a trial's primary container command into
`sh -c "<command> 1>/var/log/katib/metrics.log 2>&1 && echo completed > /var/log/katib/$$.pid"`.
When the pod is deleted (spot preemption, node drain), the kubelet signals only that sh: it neither forwards
SIGTERM nor waits, and the trainer dies with the container before its checkpoint-on-signal runs. Kubernetes
runs a container's preStop hook first, inside the same grace period, so this hook signals the trainer
processes itself and returns once they have saved their checkpoint and exited (the trainer then exits 143,
sh skips the `&& echo completed`, and restartPolicy ExitCode retries the replica).

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

PROC = Path("/proc")


def is_trainer_command(argv: list[str]) -> bool:
    """`python -m trainer ...`, `python -u -m trainer ...` (torchrun's workers), `torchrun -m trainer ...`."""
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.prestop", description=__doc__.split("\n")[0])
    parser.add_argument("--timeout", type=float, default=25.0,
                        help="seconds to wait for the checkpoint (GKE spot preemption gives about 30)")
    parser.add_argument("--under", type=int, help="only processes below this pid (default: the whole container)")
    args = parser.parse_args(argv)

    pids = trainer_pids(args.under)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + args.timeout
    while (left := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    print(f"preStop: SIGTERM to trainer pids {pids}; {'still running: ' + str(left) if left else 'all exited'}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
