"""The learning bar: 300 CPU steps with c=0.1, e=0.7, f=0.5 against the two baselines
(untrained model, random allocation) on the same eval set and seed.

    .venv/bin/python bench/learning.py [--steps 300] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from common import markdown_table, train_quietly

from trainer.config import TrainConfig
from trainer.scene_task import SceneTask


def baseline(cfg: TrainConfig, random_allocation: bool) -> float:
    torch.manual_seed(cfg.seed)
    model = SceneTask().build_model(cfg)
    return SceneTask().evaluate(model, cfg, random_allocation)["relevance_score"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(steps=args.steps, seed=seed, out=tmp, resume="never", compress_vs_particularize=0.1,
                              exploit_vs_explore=0.7, focus_vs_diversify=0.5)
            trained = train_quietly(cfg)
        untrained, random = baseline(cfg, False), baseline(cfg, True)
        score = trained["relevance_score"]
        rows.append([seed, untrained, random, score, score - untrained, trained["answer_accuracy"],
                     "yes" if score >= untrained + 0.15 and score > random else "NO"])
    print(markdown_table(["seed", "untrained", "random allocation", f"trained ({args.steps} steps)",
                          "gain over untrained", "answer_accuracy", "bar met"], rows))


if __name__ == "__main__":
    main()
