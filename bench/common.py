"""Helpers the benchmarks share: running the trainer in-process and printing Markdown tables."""
from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def train_quietly(cfg) -> dict:
    """Run trainer.train.run(cfg) with its metric lines swallowed; return metrics.json."""
    import json

    from trainer.train import run

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = run(cfg)
    if code != 0:
        raise RuntimeError(f"training exited {code}")
    return json.loads((Path(cfg.out) / "metrics.json").read_text())


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
