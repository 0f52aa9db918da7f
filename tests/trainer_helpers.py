"""Run the trainer the way a PyTorchJob container does: `python -m trainer` in a subprocess."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAST = ["--batch-size", "16", "--eval-size", "64", "--eval-every", "10", "--checkpoint-every", "10"]


def trainer_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "trainer", *args]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    return env


def run_trainer(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(trainer_cmd(*args), cwd=REPO, env=env or clean_env(), capture_output=True,
                          text=True, timeout=timeout)


def sigterm_after_first_eval(cmd: list[str], timeout: float) -> tuple[int, str, int]:
    """Start the trainer, send SIGTERM once its first evaluation is printed (midway through the run), and
    return (exit code, stderr, the step it stopped after)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("eval_loss="):
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=timeout)
    stopped = int(err.split("after step ")[1].split(";")[0]) if "after step " in err else -1
    return proc.returncode, err, stopped


def metric_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.split("=")[0] in
            ("relevance_score", "recall_at_k", "answer_accuracy", "eval_loss")]


def read_metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
