"""The Grafana dashboard (dashboards/arrcoc-training.json): its panel queries with the variables filled in, evaluated
against any Prometheus HTTP API, and drawn with matplotlib: a picture of the panels' data, not a Grafana screenshot.

    python -m pipelines.monitoring.dashboard --prometheus URL --namespace NS --run RUN --minutes 10 --out PNG
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "dashboards" / "arrcoc-training.json"


@dataclass(frozen=True)
class Query:
    panel: str
    ref: str
    expr: str
    legend: str
    unit: str


def queries(variables: dict[str, str], dashboard: Path = DASHBOARD) -> list[Query]:
    """Every panel target's PromQL with $name (and Grafana's $__rate_interval) replaced from `variables`."""
    board = json.loads(dashboard.read_text())
    out = []
    for panel in board["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name in sorted(variables, key=len, reverse=True):  # $run before $r...
                expr = expr.replace(f"${name}", variables[name])
            out.append(Query(panel["title"], target["refId"], expr, target.get("legendFormat", ""),
                             panel["fieldConfig"]["defaults"].get("unit", "")))
    return out


def api(prometheus: str, path: str, **params: Any) -> Any:
    url = f"{prometheus.rstrip('/')}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        body = json.loads(response.read())
    if body.get("status") != "success":
        raise RuntimeError(f"{url}: {body.get('error', body)}")
    return body["data"]


def _legend(template: str, labels: dict[str, str]) -> str:
    for key, value in labels.items():
        template = template.replace("{{" + key + "}}", value)
    return template


def render(prometheus: str, variables: dict[str, str], start: float, end: float, out: Path, step: float = 5.0,
           note: str = "") -> Path:
    """One subplot per panel with every target's series over [start, end]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_panel: dict[str, list[Query]] = {}
    for query in queries(variables):
        by_panel.setdefault(query.panel, []).append(query)
    rows = (len(by_panel) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(13, 2.9 * rows), squeeze=False)
    for ax, (title, panel_queries) in zip(axes.flat, by_panel.items()):
        for query in panel_queries:
            result = api(prometheus, "query_range", query=query.expr, start=start, end=end, step=step)["result"]
            for series in result:
                xs = [float(t) - start for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                ax.plot(xs, ys, label=_legend(query.legend, series["metric"]))
        ax.set_title(f"{title} ({panel_queries[0].unit})", fontsize=10)
        ax.set_xlabel("seconds", fontsize=8)
        ax.tick_params(labelsize=8)
        if ax.lines:
            ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(by_panel):]:
        ax.axis("off")
    if note:
        fig.suptitle(note, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.monitoring.dashboard",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", required=True, help="base URL of a Prometheus HTTP API")
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--run", default=".+", help="run id regex (default: every run)")
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--rate-interval", default="2m", help="what Grafana's $__rate_interval stands for")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    end = time.time()
    path = render(args.prometheus, {"namespace": args.namespace, "run": args.run,
                                    "__rate_interval": args.rate_interval},
                  end - 60 * args.minutes, end, args.out, step=max(1.0, 60 * args.minutes / 300))
    print(f"dashboard picture: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
