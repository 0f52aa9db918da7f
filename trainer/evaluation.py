"""Deterministic evaluation on a fixed eval set, and how metrics leave the process.

The metric lines follow Katib's StdOut collector format (`name=value`, one per line); only rank 0
calls `report`, so a multi-replica job reports once.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from .config import TrainConfig
from .data import EVAL_OFFSET, SceneDataset, SceneSource, collate, quiet_worker
from .distributed import World
from .files import write_json_atomic

METRICS = ("relevance_score", "recall_at_k", "answer_accuracy", "eval_loss")


def eval_source(cfg: TrainConfig, model=None):
    """The eval set: the synthetic eval stream or a prepared directory, or for a Qwen-VL model its JSONL file."""
    if hasattr(model, "collate"):
        from .vqa import VqaSource

        return VqaSource(cfg.eval_data, model.collate, cfg.max_bad_fraction)
    return SceneSource(cfg.seed, EVAL_OFFSET, cfg.eval_data, cfg.image_size, cfg.grid)


def shard(count: int, world: World) -> np.ndarray:
    """This rank's contiguous share of samples 0..count-1 (shares differ by at most one sample)."""
    return np.array_split(np.arange(count), world.world_size)[world.rank]


def batches_per_rank(cfg: TrainConfig, world: World) -> int:
    """Every rank runs the same number of eval forwards (a sharded model's forward is a collective)."""
    return math.ceil(math.ceil(cfg.eval_size / world.world_size) / cfg.batch_size)


def load_eval_batches(source: SceneSource, indices: np.ndarray, batch_count: int, num_workers: int,
                      pin_memory: bool = False) -> list[tuple[np.ndarray, dict[str, torch.Tensor], float]]:
    """The eval set, read once through a DataLoader (worker processes, not the training thread) and kept on the
    host: every evaluation of a run scores the same samples. Each entry: (sample indices, batch, weight). Exactly
    batch_count entries: a rank whose share has fewer samples than that gets stand-in batches of sample 0 with
    weight 0, so that every rank runs the same number of forwards (under FSDP each is a collective)."""
    chunks = np.array_split(indices, batch_count)
    weights = [1.0 if len(c) else 0.0 for c in chunks]
    chunks = [c if len(c) else np.zeros(1, dtype=np.int64) for c in chunks]
    loader = DataLoader(SceneDataset(source), batch_sampler=[c.tolist() for c in chunks], num_workers=num_workers,
                        collate_fn=collate, pin_memory=pin_memory, worker_init_fn=quiet_worker)
    return list(zip(chunks, loader, weights))


def batch_sums(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The METRICS summed over one batch, as one tensor on the batch's device (no host sync)."""
    truth = batch["relevance"].flatten(1)
    truth = truth / truth.sum(-1, keepdim=True).clamp_min(1e-8)
    return torch.stack([
        torch.minimum(out["share"].float(), truth).sum(),
        truth.gather(1, out["selected"]).sum(),
        (out["prediction"] == batch["answers"]).sum().float(),
        out["answer_loss"].sum(),
    ])


@torch.no_grad()
def score(model, cfg: TrainConfig, batches, device: torch.device, world: World = World(),
          random_allocation: bool = False) -> dict[str, float]:
    """Mean metrics over the eval set, each rank scoring its batches and the sums all-reduced (one host sync
    per evaluation). No noise, no RNG use, except the random-allocation baseline, whose relevance maps come
    from one generator seeded by cfg.seed (sample i gets row i whatever the sharding)."""
    was_training = model.training
    model.eval()
    random_maps = torch.rand((cfg.eval_size, cfg.grid * cfg.grid), generator=torch.Generator().manual_seed(cfg.seed)) \
        if random_allocation else None
    totals = torch.zeros(len(METRICS), dtype=torch.float64, device=device)
    for indices, host_batch, weight in batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in host_batch.items()}
        random_r = random_maps[torch.from_numpy(indices)].to(device) if random_allocation else None
        totals += weight * batch_sums(model(batch, random_relevance=random_r), batch).to(totals.dtype)
    if world.distributed:
        dist.all_reduce(totals)
    model.train(was_training)
    return dict(zip(METRICS, (totals / cfg.eval_size).tolist()))


def evaluate(model, cfg: TrainConfig, source: SceneSource, device: torch.device,
             random_allocation: bool = False) -> dict[str, float]:
    """Single-process mean metrics over samples 0..eval_size-1 of the eval stream (the CLIs' entry point)."""
    if hasattr(model, "collate"):  # a Qwen-VL model: generated answers, VQA soft accuracy (trainer/vqa.py)
        from .vqa import evaluate_vqa

        return evaluate_vqa(model, cfg, source, "random" if random_allocation else "relevance")
    batches = load_eval_batches(source, np.arange(cfg.eval_size), batches_per_rank(cfg, World()), num_workers=0)
    return score(model, cfg, batches, device, random_allocation=random_allocation)


def report(metrics: dict[str, float], stream=None) -> None:
    stream = stream or sys.stdout
    for name, value in metrics.items():  # METRICS on the synthetic path; vqa_accuracy, ... on the Qwen-VL one
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
