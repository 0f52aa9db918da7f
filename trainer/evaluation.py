"""Deterministic evaluation on a fixed eval set, and how metrics leave the process.

The metric lines follow Katib's StdOut collector format (`name=value`, one per line); only rank 0
calls `report`, so a multi-replica job reports once.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig
from .data import EVAL_OFFSET, SceneSource
from .files import write_json_atomic

METRICS = ("relevance_score", "recall_at_k", "answer_accuracy", "eval_loss")


def eval_source(cfg: TrainConfig, model=None):
    """The eval set: the synthetic eval stream or a prepared directory, or for a Qwen-VL model its JSONL file."""
    if hasattr(model, "collate"):
        from .vqa import VqaSource

        return VqaSource(cfg.eval_data, model.collate, cfg.max_bad_fraction)
    return SceneSource(cfg.seed, EVAL_OFFSET, cfg.eval_data)


@torch.no_grad()
def evaluate(model, cfg: TrainConfig, source: SceneSource, device: torch.device,
             random_allocation: bool = False) -> dict[str, float]:
    """Mean metrics over samples 0..eval_size-1 of the eval stream. No noise, no RNG use, except the
    random-allocation baseline, which draws its relevance from its own generator seeded by cfg.seed."""
    if hasattr(model, "collate"):  # a Qwen-VL model: generated answers, VQA soft accuracy (trainer/vqa.py)
        from .vqa import evaluate_vqa

        return evaluate_vqa(model, cfg, source, "random" if random_allocation else "relevance")
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(cfg.seed)
    totals = dict.fromkeys(METRICS, 0.0)
    # Batches of the training batch size: known to fit the device, and on CPU faster than larger ones.
    for start in range(0, cfg.eval_size, cfg.batch_size):
        idx = np.arange(start, min(start + cfg.batch_size, cfg.eval_size))
        batch = {k: torch.from_numpy(v).to(device) for k, v in source.batch(idx).items()}
        n = len(idx)
        random_r = torch.rand((n, cfg.grid * cfg.grid), generator=generator).to(device) if random_allocation else None
        out = model(batch, random_relevance=random_r)
        truth = batch["relevance"].flatten(1)
        truth = truth / truth.sum(-1, keepdim=True).clamp_min(1e-8)
        totals["relevance_score"] += torch.minimum(out["share"], truth).sum(-1).sum().item()
        totals["recall_at_k"] += truth.gather(1, out["selected"]).sum(-1).sum().item()
        totals["answer_accuracy"] += (out["prediction"] == batch["answers"]).float().sum().item()
        totals["eval_loss"] += out["answer_loss"].sum().item()
    model.train(was_training)
    return {k: v / cfg.eval_size for k, v in totals.items()}


def report(metrics: dict[str, float], stream=None) -> None:
    stream = stream or sys.stdout
    for name, value in metrics.items():  # METRICS on the synthetic path; vqa_accuracy, ... on the Qwen-VL one
        print(f"{name}={value:.6f}", file=stream)
    stream.flush()


def write_metrics(out: Path, step: int, metrics: dict[str, float], history: list[dict], cfg: TrainConfig) -> None:
    write_json_atomic(out / "metrics.json", {
        "step": step, **metrics, "tensions": cfg.tensions(), "history": history,
    })
