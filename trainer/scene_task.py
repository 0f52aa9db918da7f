"""The synthetic-scenes task: ArrCoc on the tiny LM (or a pretrained causal LM), scenes generated from the seed or
read from a prepared scenes.npz, scored as relevance_score, recall_at_k, answer_accuracy and eval_loss.

Evaluation is deterministic: no noise and no RNG use, except the random-allocation baseline, whose relevance maps
come from one generator seeded by cfg.seed (sample i gets row i whatever the sharding).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .config import TrainConfig
from .data import COLOURS, EVAL_OFFSET, TOKEN, VOCAB, SceneDataset, SceneSource, collate, load_unlabeled, quiet_worker
from .distributed import World, shard
from .model import ArrCoc, cells_selected
from .task import Example, Review, RunParts, Task

METRICS = ("relevance_score", "recall_at_k", "answer_accuracy", "eval_loss")
QUESTION = {"SHAPE?": "Which shape is the {colour} object?", "WHERE?": "Where is the {colour} object?"}
PICTURE_SCENES = 4  # eval scenes drawn in TensorBoard at each evaluation
MAX_UNLABELED_IMAGES = 4  # each unlabeled image of a review is drawn under every colour query: 6 rows apiece


def eval_source(cfg: TrainConfig) -> SceneSource:
    """The eval set: the seed's synthetic eval stream, or the prepared dataset cfg.eval_data."""
    return SceneSource(cfg.seed, EVAL_OFFSET, cfg.eval_data, cfg.image_size, cfg.grid)


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
    """Mean METRICS over the eval set, each rank scoring its batches and the sums all-reduced (one host sync per
    evaluation)."""
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


@torch.no_grad()
def allocation_pictures(model: ArrCoc, scenes: dict) -> torch.Tensor:
    """[N,3,H,2W] in [0,1]: each eval scene beside its allocation share, a heat map upsampled to the image."""
    was_training = model.training
    model.eval()
    device = model.device
    batch = {k: torch.as_tensor(v).to(device) for k, v in scenes.items()}
    share = model(batch)["share"].float()
    model.train(was_training)
    images = batch["images"].permute(0, 3, 1, 2).float() / 255.0
    g = model.cfg.grid
    heat = share.reshape(-1, 1, g, g) / share.amax(dim=1).clamp_min(1e-8).view(-1, 1, 1, 1)
    heat = F.interpolate(heat, size=images.shape[-2:], mode="nearest").expand(-1, 3, -1, -1)
    return torch.cat([images, heat], dim=-1).cpu()


@torch.no_grad()
def examples(model: ArrCoc, batch: dict[str, np.ndarray], labels: list[str], with_truth: bool) -> list[Example]:
    """What the report draws of each scene in `batch`: relevance, tokens per cell, truth and answers."""
    was_training = model.training
    model.eval()
    cfg = model.cfg
    out = model({k: torch.from_numpy(np.ascontiguousarray(v)).to(model.device) for k, v in batch.items()})
    model.train(was_training)
    total_tokens = cells_selected(cfg) * (1 + cfg.max_tokens_per_cell) / 2  # the allocator's fixed total
    grid = cfg.grid
    rows = []
    for i, label in enumerate(labels):
        qtype, colour = (VOCAB[t] for t in batch["queries"][i])
        rows.append(Example(
            image=batch["images"][i], question=QUESTION[qtype].format(colour=colour),
            relevance=out["relevance"][i].reshape(grid, grid).float().cpu().numpy(),
            tokens=(out["share"][i] * total_tokens).reshape(grid, grid).float().cpu().numpy(),
            truth=batch["relevance"][i] if with_truth else None,
            answer=VOCAB[int(batch["answers"][i])] if with_truth else None,
            predicted=VOCAB[int(out["prediction"][i])], label=label,
        ))
    return rows


def unlabeled_batch(images: np.ndarray, names: np.ndarray, grid: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """Every image under every colour query (SHAPE?); no ground truth, so relevance and answers are zeros."""
    images, names = images[:MAX_UNLABELED_IMAGES], names[:MAX_UNLABELED_IMAGES]
    n, k = len(images), len(COLOURS)
    queries = np.array([[TOKEN["SHAPE?"], TOKEN[c]] for c in COLOURS] * n, dtype=np.int64)
    batch = {"images": np.repeat(images, k, axis=0), "queries": queries,
             "answers": np.full(n * k, TOKEN["square"], dtype=np.int64),
             "relevance": np.zeros((n * k, grid, grid), np.float32)}
    return batch, [str(name) for name in np.repeat(names, k)]


class SceneTask(Task):
    name = "scenes"

    def build_model(self, cfg: TrainConfig, adapter_dir: Path | None = None) -> ArrCoc:
        return ArrCoc(cfg, adapter_dir)

    def run_parts(self, cfg: TrainConfig, world: World, model: ArrCoc) -> RunParts:
        train_data = SceneDataset(SceneSource(cfg.seed, 0, cfg.train_data, cfg.image_size, cfg.grid))
        source = eval_source(cfg)
        eval_batches = load_eval_batches(source, shard(cfg.eval_size, world), batches_per_rank(cfg, world),
                                         cfg.num_workers, pin_memory=world.device.type == "cuda")
        picture_batch = source.batch(np.arange(min(PICTURE_SCENES, cfg.eval_size)))
        return RunParts(train_data, collate,
                        evaluate=lambda m: score(m, cfg, eval_batches, world.device, world),
                        pictures=lambda m: allocation_pictures(m, picture_batch),
                        finish=lambda m, out: None)

    def evaluate(self, model: ArrCoc, cfg: TrainConfig, random_allocation: bool = False) -> dict[str, float]:
        batches = load_eval_batches(eval_source(cfg), np.arange(cfg.eval_size), batches_per_rank(cfg, World()),
                                    num_workers=0)
        return score(model, cfg, batches, model.device, random_allocation=random_allocation)

    def eval_set_size(self, cfg: TrainConfig) -> int:
        return len(eval_source(cfg)) if cfg.eval_data else cfg.eval_size

    def review(self, model: ArrCoc, cfg: TrainConfig, metrics: dict[str, float], samples: int) -> Review:
        baseline = self.evaluate(model, cfg, random_allocation=True)
        n = min(int(samples), cfg.eval_size)
        scenes = examples(model, eval_source(cfg).batch(np.arange(n)), [f"eval scene {i}" for i in range(n)],
                          with_truth=True)
        unlabeled = load_unlabeled(cfg.eval_data) if cfg.eval_data else None
        drawn = examples(model, *unlabeled_batch(*unlabeled, cfg.grid), with_truth=False) if unlabeled else []
        source = "synthetic"
        if cfg.eval_data and (Path(cfg.eval_data) / "metadata.json").is_file():
            source = json.loads((Path(cfg.eval_data) / "metadata.json").read_text()).get("source", "?")
        facts = {"eval scenes": cfg.eval_size, "data source": source, "seed": cfg.seed, "base model": cfg.base_model,
                 "cells selected (K)": cells_selected(cfg)}
        return Review(baseline, facts, scenes, drawn)
