"""Do the three tensions matter? A coarse grid per tension (the other two at their defaults), short
real training runs, and the spread (max - min) of the final relevance_score per tension.

    .venv/bin/python bench/tension_sweep.py [--steps 150] [--write docs/tension-sweep.md]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace

from common import REPO, markdown_table, train_quietly

from trainer.config import TENSIONS, TrainConfig

GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", help="also write the table to this Markdown file")
    args = parser.parse_args()
    base = TrainConfig(steps=args.steps, eval_every=args.steps, eval_size=256, checkpoint_every=args.steps,
                       seed=args.seed, resume="never")
    began = time.perf_counter()
    rows, spreads = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for tension in TENSIONS:
            scores = []
            for value in GRID:
                cfg = replace(base, out=f"{tmp}/{tension}-{value}", **{tension: value})
                scores.append(train_quietly(cfg)["relevance_score"])
            spreads[tension] = max(scores) - min(scores)
            rows.append([tension, *scores, spreads[tension]])
    table = markdown_table(["tension", *[f"{v:g}" for v in GRID], "spread"], rows)
    mattering = sum(s >= 0.05 for s in spreads.values())
    summary = (f"{args.steps} steps per run, seed {args.seed}, defaults elsewhere "
               f"(c=0.1, e=0.7, f=0.5); {mattering} of 3 tensions have a spread >= 0.05; "
               f"{time.perf_counter() - began:.0f} s in all.")
    print(table)
    print(summary)
    if args.write:
        path = REPO / args.write
        path.write_text(f"# Tension sweep (bench/tension_sweep.py)\n\nFinal relevance_score per grid value.\n\n"
                        f"{table}\n\n{summary}\n")


if __name__ == "__main__":
    main()
