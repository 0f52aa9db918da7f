"""Input pipeline: samples/s the trainer's DataLoader delivers against samples/s the trainer consumes.

Same config (the trainer's defaults: batch 32, --num-workers 2, synthetic 64x64 scenes), same process, one
after the other:
- loader: the training DataLoader alone (trainer.train.train_loader: ShardSampler, worker processes, collate),
  iterated for --batches batches;
- consumer: train_step (forward, backward, optimizer) on batches already in memory, for --steps steps.
The loader must stay ahead of the consumer: the ratio loader/consumer is the headroom (goal >= 3 on 2 cores).

    .venv/bin/python bench/input_pipeline.py [--batches 60] [--steps 20]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
from common import markdown_table

from trainer.config import TrainConfig
from trainer.distributed import World
from trainer.train import build_optimization, build_run, train_loader, train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    world = World()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(out=tmp, eval_size=32)
        _, model, parts = build_run(cfg, world)
        batches = iter(train_loader(parts, cfg, world, 0))
        next(batches)  # workers started
        began = time.perf_counter()
        held = [next(batches) for _ in range(args.batches)]
        loader_rate = args.batches * cfg.batch_size / (time.perf_counter() - began)
        del batches

        engine, optimizer, scheduler = build_optimization(model, cfg, world)
        generator = torch.Generator().manual_seed(0)
        train_step(engine, model, optimizer, scheduler, [held[0]], [model.training_noise(held[0], generator)],
                   cfg)  # warm-up
        began = time.perf_counter()
        for step in range(args.steps):
            batch = held[step % len(held)]
            train_step(engine, model, optimizer, scheduler, [batch], [model.training_noise(batch, generator)],
                       cfg)
        consumer_rate = args.steps * cfg.batch_size / (time.perf_counter() - began)
    print(markdown_table(["side", "samples/s"], [
        [f"DataLoader ({cfg.num_workers} workers, batch {cfg.batch_size})", loader_rate],
        ["trainer consumption (train_step on in-memory batches)", consumer_rate],
        ["ratio loader/consumer", loader_rate / consumer_rate],
    ]))


if __name__ == "__main__":
    main()
