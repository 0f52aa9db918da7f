"""The model store: where the register step puts a gated adapter and its model card.

Layout: <model_store>/<run id>/adapter/ (the loadable adapter), model_card.json (machine-readable) and
MODEL_CARD.md (for people). The entry appears whole or not at all: it is assembled in a temporary directory
beside it and renamed into place; a retried step replaces its own entry. The pipeline calls this step only
inside dsl.If(<gate metric> >= threshold), so below the threshold nothing is written (not-registered says so).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from trainer.config import TENSIONS
from trainer.files import replace_dir


def model_card(adapter_dir: Path, metrics: dict[str, float], threshold: float, lineage: dict[str, Any],
               gate_metric: str = "relevance_score") -> dict:
    config = json.loads((adapter_dir / "arrcoc_config.json").read_text())
    return {
        "model": "arrcoc-adapter",
        "metrics": dict(sorted(metrics.items())),
        "gate": {"metric": gate_metric, "threshold": threshold},
        "tensions": {name: config[name] for name in TENSIONS},
        "training": {k: config[k] for k in ("steps", "batch_size", "lr", "seed", "base_model", "strategy")},
        "lineage": lineage,
    }


def card_markdown(card: dict) -> str:
    lines = ["# ARR-COC adapter", "", f"Registered from KFP run `{card['lineage'].get('run_id')}`.", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in card["metrics"].items()]
    lines += ["", f"Gate: {card['gate']['metric']} >= {card['gate']['threshold']:g}.", "",
              "| tension | value |", "|---|---|"]
    lines += [f"| {k} | {v:g} |" for k, v in card["tensions"].items()]
    lines += ["", "Lineage:", ""] + [f"- {k}: `{v}`" for k, v in card["lineage"].items()]
    return "\n".join(lines) + "\n"


def below_threshold(value: float, threshold: float, gate_metric: str) -> str:
    """What the run shows in the card's place when the gate is closed."""
    return f"Not registered: {gate_metric} {value:.4f} is below the threshold {threshold:g}.\n"


def register_model(adapter_dir: str | Path, model_store: str | Path, run_id: str, metrics: dict[str, float],
                   threshold: float, lineage: dict[str, Any], gate_metric: str = "relevance_score") -> tuple[Path, str]:
    """The registered entry's path and its MODEL_CARD.md."""
    adapter_dir, store = Path(adapter_dir), Path(model_store)
    if not (adapter_dir / "arrcoc_config.json").is_file():
        raise ValueError(f"adapter {adapter_dir}: no arrcoc_config.json; not an ARR-COC adapter")
    store.mkdir(parents=True, exist_ok=True)
    final = store / run_id
    tmp = store / f".{run_id}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(adapter_dir, tmp / "adapter")
    card = model_card(adapter_dir, metrics, threshold, {"run_id": run_id, **lineage}, gate_metric)
    (tmp / "model_card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    markdown = card_markdown(card)
    (tmp / "MODEL_CARD.md").write_text(markdown)
    return replace_dir(tmp, final), markdown
