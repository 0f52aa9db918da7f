"""`arrcoc evaluate`: the Katib metric lines for a saved adapter or for one of the two baselines.

All three modes read the same eval set (the eval stream of --seed, --eval-size samples), so their
numbers compare directly: --untrained is the model as the trainer builds it at step 0 (same seed),
--random-allocation replaces the blended relevance map by uniform noise.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .config import add_arguments as add_config_arguments
from .config import config_from_args

EVAL_OVERRIDES = ("eval_size", "seed", "eval_data")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--adapter", metavar="DIR", help="a saved adapter directory (OUT/adapter)")
    mode.add_argument("--untrained", action="store_true", help="baseline: the model before any step")
    mode.add_argument("--random-allocation", action="store_true", help="baseline: random relevance map")
    parser.add_argument("--json", metavar="FILE", help="also write the metrics to FILE (atomically)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from .evaluation import report
    from .files import write_json_atomic
    from .model import AdapterError
    from .tasks import load_adapter, task_for

    if args.adapter:
        if not Path(args.adapter).is_dir():
            raise AdapterError(f"adapter {args.adapter}: not a directory")
        overrides = {k: getattr(args, k) for k in EVAL_OVERRIDES if getattr(args, k) is not None}
        model, task = load_adapter(args.adapter, **overrides)
        cfg = model.cfg.validate()
    else:
        cfg = config_from_args(args)
        task = task_for(cfg)
        torch.manual_seed(cfg.seed)  # the trainer's step-0 initialisation
        model = task.build_model(cfg)
    metrics = task.evaluate(model, cfg, random_allocation=args.random_allocation)
    report(metrics)
    if args.json:
        write_json_atomic(Path(args.json), metrics)
    return 0
