"""How metrics leave the process: Katib's metric lines on stdout and OUT/metrics.json.

The metric lines follow Katib's StdOut collector format (`name=value`, one per line); only rank 0 calls `report`,
so a multi-replica job reports once. Each task computes its own metrics (trainer/scene_task.py, trainer/vqa.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

from .config import TrainConfig
from .files import write_json_atomic


def report(metrics: dict[str, float], stream=None) -> None:
    stream = stream or sys.stdout
    for name, value in metrics.items():
        print(f"{name}={value:.6f}", file=stream)
    stream.flush()


def write_metrics(out: Path, step: int, metrics: dict[str, float], history: list[dict], cfg: TrainConfig,
                  loss_curve: list[dict] | None = None, checkpoints_skipped: int = 0) -> None:
    """OUT/metrics.json: the latest evaluation, every evaluation so far, the training-loss curve, and how many
    unreadable checkpoints the last resume skipped (the pipeline's report draws its curves from this file)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "metrics.json", {
        "step": step, **metrics, "tensions": cfg.tensions(), "history": history, "loss_curve": loss_curve or [],
        "checkpoints_skipped": checkpoints_skipped,
    })
