"""The evaluation report: one HTML page of pictures (base64 PNGs, no external files) and a Markdown summary.

Each row is one query on one image, drawn as four panels a person reads at a glance:
image | blended relevance r | ground truth | token allocation (selected cells outlined, tokens per cell).
Image-folder rows have no ground truth; their third panel says so.
"""
from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from trainer.task import Example

def _fixed(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _overlay(ax, image: np.ndarray, cells: np.ndarray, cmap: str, vmax: float, title: str,
             hide_zeros: bool = False) -> None:
    h, w = image.shape[:2]
    ax.imshow(image, interpolation="nearest")
    if hide_zeros:  # cells that got nothing stay see-through, so the eye goes to those that did
        cells = np.ma.masked_equal(cells, 0)
    ax.imshow(cells, cmap=cmap, vmin=0.0, vmax=vmax, alpha=0.6, extent=(0, w, h, 0), interpolation="nearest")
    ax.set_title(title, fontsize=9)


def row_png(row: Example, dpi: int = 72) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # no display in a pipeline pod or under kfp.local
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, axes = plt.subplots(1, 4, figsize=(9.6, 2.8))
    h, w = row.image.shape[:2]
    grid = row.relevance.shape[0]
    cell_h, cell_w = h / grid, w / grid
    axes[0].imshow(row.image, interpolation="nearest")
    axes[0].set_title("image", fontsize=9)
    _overlay(axes[1], row.image, row.relevance, "inferno", 1.0, "blended relevance r")
    if row.truth is None:
        axes[2].imshow(row.image, interpolation="nearest", alpha=0.25)
        axes[2].text(w / 2, h / 2, "no ground truth\n(image folder)", ha="center", va="center", fontsize=9)
        axes[2].set_title("ground truth", fontsize=9)
    else:
        _overlay(axes[2], row.image, row.truth, "Greens", 1.0, "ground truth", hide_zeros=True)
    _overlay(axes[3], row.image, row.tokens, "viridis", max(float(row.tokens.max()), 1.0),
             f"tokens ({int(round(row.tokens.sum()))} in {int((row.tokens > 0).sum())} cells)", hide_zeros=True)
    for y, x in zip(*np.nonzero(row.tokens)):
        axes[3].add_patch(Rectangle((x * cell_w, y * cell_h), cell_w, cell_h, fill=False, edgecolor="white", lw=1))
        axes[3].text((x + 0.5) * cell_w, (y + 0.5) * cell_h, f"{row.tokens[y, x]:.0f}", color="white",
                     ha="center", va="center", fontsize=7, fontweight="bold")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    verdict = "" if row.answer is None else f"   answer: {row.answer}, predicted: {row.predicted}" + \
        (" (right)" if row.answer == row.predicted else " (wrong)")
    fig.suptitle(f"{row.label}: {row.question}{verdict}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def load_curves(adapter_dir) -> dict | None:
    """The training run's curves saved beside the adapter (trainer.curves.TRAINING_CURVES), or None."""
    import json
    from pathlib import Path

    from trainer.curves import TRAINING_CURVES

    try:
        return json.loads((Path(adapter_dir) / TRAINING_CURVES).read_text())
    except (OSError, ValueError):
        return None  # an adapter saved before curves were kept, or by another tool


def curves_svg(curves: Mapping[str, list]) -> str:
    """Training loss, and every evaluation metric when there are two evaluations or more, against the optimizer
    step, as inline SVG (line plots stay sharp at any zoom; the page's PNGs are the per-query pictures)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = curves.get("eval") or []
    fig, axes = plt.subplots(1, 2 if len(evals) > 1 else 1, figsize=(9.6 if len(evals) > 1 else 4.8, 3.0),
                             squeeze=False)
    loss = curves.get("loss") or []
    left = axes[0][0]
    left.plot([p["step"] for p in loss], [p["loss"] for p in loss], marker=".")
    left.set_title("training loss", fontsize=9)
    left.set_xlabel("step", fontsize=8)
    if len(evals) > 1:
        right = axes[0][1]
        for name in (k for k in evals[0] if k != "step"):
            right.plot([e["step"] for e in evals], [e[name] for e in evals], marker="o", label=name)
        right.set_title("evaluation", fontsize=9)
        right.set_xlabel("step", fontsize=8)
        right.legend(fontsize=7)
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and doctype: the SVG sits inside the HTML page


def _evaluations_table(evals: Sequence[Mapping[str, float]]) -> str:
    """The run's evaluations as a table (a single evaluation is one point: no chart)."""
    names = [k for k in evals[0] if k != "step"]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ("step", *names))
    rows = "".join("<tr>" + f"<td>{e['step']}</td>" + "".join(f"<td>{e[n]:.4f}</td>" for n in names) + "</tr>"
                   for e in evals)
    return f"<table><tr>{head}</tr>{rows}</table>"


def _table(pairs: Sequence[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in pairs)
    return f"<table>{cells}</table>"


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def budget_curve_section(curve: Mapping) -> str:
    """The accuracy vs visual-token budget curve (trainer.vqa.budget_curve): its PNG and its table."""
    from trainer.vqa import curve_png

    data = base64.b64encode(curve_png(curve)).decode("ascii")
    head = ("token fraction", "visual tokens", "ARR-COC", "random", "uniform (strided)", "all tokens")
    rows = "".join(
        "<tr>" + "".join(f"<td>{v}</td>" for v in (f"{r['fraction']:g}", f"{r['visual_tokens']:.1f}",
                                                   f"{r['relevance']:.3f}", f"{r['random']:.3f}",
                                                   f"{r['uniform']:.3f}", f"{curve['all_tokens']:.3f}")) + "</tr>"
        for r in curve["rows"])
    return ("<h2>VQA accuracy vs visual-token budget</h2>"
            "<p>The same eval questions answered with the LM reading only the kept visual tokens: chosen by the "
            "adapter, at random, or evenly strided; the line is every token (the upper bound).</p>"
            f'<figure><img src="data:image/png;base64,{data}" alt="accuracy vs visual-token budget"></figure>'
            "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + f"</tr>{rows}</table>")


def html_report(metrics: Mapping[str, float], baseline: Mapping[str, float], tensions: Mapping[str, float],
                facts: Mapping[str, object], scene_rows: Sequence[Example], folder_rows: Sequence[Example],
                curves: Mapping[str, list] | None = None, budget_curve: Mapping | None = None) -> str:
    """The whole page; every picture is embedded (the KFP UI shows an HTML artifact as a single file)."""
    def figures(rows: Sequence[Example]) -> str:
        out = []
        for row in rows:
            data = base64.b64encode(row_png(row)).decode("ascii")
            alt = html.escape(f"{row.label}: {row.question}")
            out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{alt}"></figure>')
        return "\n".join(out)

    metric_rows = [(name, f"{value:.4f}" + (f"  (random allocation: {baseline[name]:.4f})" if name in baseline else ""))
                   for name, value in metrics.items()]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>ARR-COC evaluation</title>",
        "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;margin-bottom:1em}"
        "th,td{border:1px solid #ccc;padding:2px 8px;text-align:left}figure{margin:0 0 8px 0}"
        "img{max-width:100%}</style></head><body>",
        "<h1>ARR-COC adapter: where the tokens went</h1>",
        "<p>Each row: the image, the blended relevance map r the adapter computed for the question, the "
        "ground-truth relevance of the queried object, and the visual tokens the allocator spent per cell.</p>",
        "<h2>Metrics (eval set)</h2>", _table(metric_rows),
        "<h2>Tensions</h2>", _table([(k, _fmt(v)) for k, v in tensions.items()]),
        "<h2>Run</h2>", _table([(k, _fmt(v)) for k, v in facts.items()]),
    ]
    if curves:
        parts += ["<h2>Training curves</h2>", f"<figure>{curves_svg(curves)}</figure>"]
        if len(curves.get("eval") or []) == 1:
            parts += ["<h2>Evaluation during training</h2>", _evaluations_table(curves["eval"])]
    if budget_curve:
        parts.append(budget_curve_section(budget_curve))
    if scene_rows or not budget_curve:
        parts += [f"<h2>Eval scenes ({len(scene_rows)})</h2>", figures(scene_rows)]
    if folder_rows:
        parts += [f"<h2>Image folder ({len(folder_rows)} queries)</h2>",
                  "<p>These images have no queries and no ground truth: each is shown under every colour query; "
                  "they do not enter the metrics.</p>", figures(folder_rows)]
    parts.append("</body></html>")
    return "\n".join(parts)


def markdown_summary(metrics: Mapping[str, float], baseline: Mapping[str, float], tensions: Mapping[str, float],
                     threshold: float, budget_curve: Mapping | None = None,
                     gate_metric: str = "relevance_score") -> str:
    score = metrics[gate_metric]
    verdict = "passes" if score >= threshold else "does not pass"
    lines = [
        "# ARR-COC evaluation",
        "",
        f"{gate_metric} **{score:.4f}** {verdict} the gate (threshold {threshold:g}).",
        "",
        "| metric | adapter | random allocation |",
        "|---|---|---|",
        # a metric the baseline has no counterpart for (lod_full, lod_coarse: random selection has no regions): "-"
        *[f"| {name} | {value:.4f} | {_fixed(baseline.get(name))} |" for name, value in metrics.items()],
        "",
        "| tension | value |",
        "|---|---|",
        *[f"| {name} | {value:g} |" for name, value in tensions.items()],
        "",
    ]
    if budget_curve:
        from trainer.vqa import curve_table

        lines += ["## VQA accuracy vs visual-token budget", "", curve_table(budget_curve)]
    return "\n".join(lines)
