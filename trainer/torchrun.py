"""torchrun with the exit codes restartPolicy ExitCode reads: `python -m trainer.torchrun -m trainer ...`.

torchrun itself exits 1 whenever its workers fail or it is signalled: a SIGTERM becomes an uncaught SignalException
(torch/distributed/elastic/multiprocessing/api.py _terminate_process_handler, re-raised by launch_agent in
torch/distributed/launcher/api.py) and a failed worker a ChildFailedError. The operator's ExitCode policy retries
128-255 and fails at once on 1-127, so a preempted pod of several processes, or a Katib trial (its command is
this one), would fail for good after its trainers had checkpointed and exited 143. Here the exit code is the
signal's (128 + N) or the worst worker's (a worker killed by signal N counts as 128 + N); everything else is
torchrun's own `main`, flags and PET_* variables included.
"""
from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main


def worker_exit_code(code: int) -> int:
    """torchelastic reports a worker killed by signal N as -N; a container reports it as 128 + N."""
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    try:
        torchrun_main(argv)
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        return max(worker_exit_code(failure.exitcode) for failure in exc.failures.values())
    return 0


if __name__ == "__main__":
    sys.exit(main())
