"""Trainer overhead: `arrcoc train` samples/s against a bare torch loop over the same model and batches.

Both run in this process, one after the other, on the same data stream, batch size, precision (bf16 by
default) and gradient accumulation (2 by default). The bare loop is only forward/backward/clip/AdamW step with
scenes generated inline; the trainer adds what a real run needs: its DataLoader (worker processes), periodic
evaluation, atomic checkpoints, metric lines, TensorBoard curves, the stop-flag check. The bare loop over one
pre-built batch shows the share of data generation.

    .venv/bin/python bench/throughput.py [--steps 200] [--batch-size 32] [--precision bf16] [--grad-accum 2]
"""
from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import threading
import time
import urllib.request

import numpy as np
import torch
from common import markdown_table, train_quietly

from trainer.config import TrainConfig
from trainer.data import SceneSource
from trainer.model import ArrCoc, gumbel_noise
from trainer.train import lr_lambda, step_seed


def bare_loop(cfg: TrainConfig, fixed_batch: bool) -> float:
    torch.manual_seed(cfg.seed)
    model = ArrCoc(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    source = SceneSource(cfg.seed)
    one = {k: torch.from_numpy(v) for k, v in source.batch(np.arange(cfg.batch_size)).items()}
    began = time.perf_counter()
    for step in range(cfg.steps):
        for micro in range(cfg.grad_accum):
            first = (step * cfg.grad_accum + micro) * cfg.batch_size
            batch = one if fixed_batch else {k: torch.from_numpy(v) for k, v in source.batch(
                np.arange(first, first + cfg.batch_size)).items()}
            noise = gumbel_noise(torch.Size((cfg.batch_size, cfg.grid ** 2)), cfg,
                                 torch.Generator().manual_seed(step_seed(cfg, step, 0, micro)))
            (model(batch, noise=noise)["loss"] / cfg.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return cfg.steps * cfg.batch_size * cfg.grad_accum / (time.perf_counter() - began)


SCRAPE_EVERY = 0.5  # seconds


def _scrape_until(port: int, stop: threading.Event, count: list[int]) -> None:
    while not stop.wait(SCRAPE_EVERY):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
            count[0] += 1
        except OSError:
            pass  # before the exporter starts and after it stops


def trainer_rate(cfg: TrainConfig, exporter: bool = False) -> tuple[float, int]:
    """(samples/s, scrapes answered) of `arrcoc train`, with the exporter scraped throughout when asked."""
    port = 0
    if exporter:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    stop, count = threading.Event(), [0]
    scraper = threading.Thread(target=_scrape_until, args=(port, stop, count), daemon=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(**{**cfg.to_dict(), "out": tmp, "resume": "never", "metrics_port": port})
        if exporter:
            scraper.start()
        began = time.perf_counter()
        try:
            train_quietly(cfg)
        finally:
            stop.set()
        return cfg.steps * cfg.batch_size * cfg.grad_accum / (time.perf_counter() - began), count[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--grad-accum", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)  # both sides on one core, so other load on the machine matters less
    # The trainer's own defaults for evaluation and checkpoint cadence (every 100 and 50 steps).
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, precision=args.precision,
                      grad_accum=args.grad_accum)
    bare, trainer, exported, fixed, scrapes = [], [], [], [], []
    for _ in range(args.repeats):  # interleaved: each trainer run is compared with the bare run next to it
        bare.append(bare_loop(cfg, fixed_batch=False))
        trainer.append(trainer_rate(cfg)[0])
        rate, answered = trainer_rate(cfg, exporter=True)
        exported.append(rate)
        scrapes.append(answered)
        fixed.append(bare_loop(cfg, fixed_batch=True))
    # Shared CPUs drift by +-10% between runs; the median of paired ratios is steadier than best-of.
    ratios = sorted(t / b for t, b in zip(trainer, bare))
    exported_ratios = sorted(e / b for e, b in zip(exported, bare))
    on_off = sorted(e / t for e, t in zip(exported, trainer))
    fixed_ratios = [f / b for f, b in zip(fixed, bare)]
    print(markdown_table(["loop", "samples/s (median)", "vs bare loop (median of pairs)"], [
        ["bare torch loop (same data stream)", statistics.median(bare), 1.0],
        ["arrcoc train (eval, checkpoints, metric lines), exporter off", statistics.median(trainer),
         statistics.median(ratios)],
        [f"arrcoc train, exporter on, scraped every {SCRAPE_EVERY:g} s", statistics.median(exported),
         statistics.median(exported_ratios)],
        ["bare loop on one pre-built batch", statistics.median(fixed), statistics.median(fixed_ratios)],
    ]))
    print(f"exporter: {statistics.median(exported_ratios):.3f}x the bare loop (pairs {exported_ratios[0]:.3f}-"
          f"{exported_ratios[-1]:.3f}; target >= 0.9), {statistics.median(on_off):.3f}x the trainer without it "
          f"(pairs {on_off[0]:.3f}-{on_off[-1]:.3f}); {min(scrapes)}-{max(scrapes)} scrapes answered per run")
    print(f"trainer overhead: {100 * (1 - statistics.median(ratios)):.1f}% of bare-loop throughput (paired ratios "
          f"{ratios[0]:.3f}-{ratios[-1]:.3f}; {args.steps} steps, batch {args.batch_size} x {args.grad_accum} "
          f"accumulation, {args.precision}, 1 thread, "
          f"{args.repeats} pairs)")


if __name__ == "__main__":
    main()
