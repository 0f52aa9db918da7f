"""Run the trainer the way a PyTorchJob container does (`python -m trainer` in a subprocess), and the checks on
a model that both the synthetic and the Qwen-VL tests make."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch

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


def assert_bf16_base_and_fp32_trainables(model: torch.nn.Module) -> None:
    """--precision bf16: the frozen base is stored in bf16, every trainable weight stays fp32."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert trainable and all(p.dtype == torch.float32 for p in trainable)


def assert_fp32_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    moments = [t for s in optimizer.state_dict()["state"].values() for k, t in s.items() if k != "step"]
    assert moments and all(t.dtype == torch.float32 for t in moments)


def attention_runs_per_layer(layers, step, *args) -> float:
    """How many times each decoder layer's attention block runs during step(*args) (forward and backward).
    transformers checkpoints a layer's forward (the layer's own hooks run once) and torch stops the recompute once
    the last saved tensor is back (its early stop), so the attention block, a layer's first part, is counted."""
    count = [0]
    handles = [layer.self_attn.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
               for layer in layers]
    try:
        step(*args)
    finally:
        for handle in handles:
            handle.remove()
    return count[0] / len(layers)
