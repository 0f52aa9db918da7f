"""`arrcoc train` and `python -m trainer`: the same flags, the same code path."""
from __future__ import annotations

import argparse
import sys

from .config import add_arguments, config_from_args, parse_config  # noqa: F401  (add_arguments: the arrcoc CLI contract)


def run(args: argparse.Namespace) -> int:
    from .train import run as train  # torch and transformers load only once the flags are good

    return train(config_from_args(args))


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
        from .train import run as train

        return train(cfg)
    except ValueError as exc:
        if not hasattr(exc, "exit_code"):
            raise
        print(f"python -m trainer: error: {exc}", file=sys.stderr)
        return exc.exit_code
