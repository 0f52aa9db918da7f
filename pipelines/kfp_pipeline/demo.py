"""`arrcoc demo`: the whole pipeline on this machine, offline, in a few minutes (what `make demo` runs).

It is the pipeline users upload, run by kfp.local's SubprocessRunner in this virtual environment (no
containers, no network) with backend "local": the train step builds the same PyTorchJob it would create on a
cluster and hands it to the local runner, which starts the Master and one Worker as two processes.
Outputs go under --workdir: kfp.local's pipeline root (one folder per run and task), and the model store.
The default settings are small enough for 2 CPU cores and clear the default gate (docs/pipeline.md).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import UserError

DEFAULT_WORKDIR = "runs/demo"
# Measured on 2 shared cores (docs/pipeline.md): ~190 s, relevance_score ~0.60 against DEFAULT_THRESHOLD 0.4;
# 80 steps reached only ~0.36.
DEMO = {"steps": 150, "batch_size": 16, "train_size": 1024, "eval_size": 64, "workers": 1, "report_samples": 6}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class DemoError(RuntimeError):
    exit_code = 1


class DemoInputError(UserError):
    """A demo setting the pipeline does not take: one line, exit code 2."""


@dataclass
class DemoResult:
    run_dir: Path
    report: Path
    summary: Path
    metrics: Path
    relevance_score: float
    adapter: Path
    job_dir: Path
    registered: Path | None
    seconds: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipelines.kfp_pipeline.pipeline import DEFAULT_THRESHOLD

    parser.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"where outputs go (default: {DEFAULT_WORKDIR})")
    parser.add_argument("--source", default="synthetic", help="synthetic, or an image folder drawn in the report")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"gate: register when relevance_score >= this (default: {DEFAULT_THRESHOLD})")
    parser.add_argument("--team-config", metavar="FILE",
                        help="a team-config ConfigMap YAML for the PyTorchJob (default: TeamConfig.local_default())")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-metrics", action="store_true",
                        help="no Prometheus exporter in the trainer (by default each replica serves its metrics)")
    for name, value in DEMO.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=value, help=f"(default: {value})")


def run_demo(workdir: str | Path, *, source: str = "synthetic", threshold: float | None = None,
             team_config: str | None = None, seed: int = 0, quiet: bool = False, metrics: bool = True,
             **settings: int) -> DemoResult:
    """Run the pipeline with kfp.local; settings override DEMO (steps, batch_size, ...)."""
    import kfp.local

    from pipelines.kfp_pipeline.pipeline import DEFAULT_THRESHOLD, arrcoc_train
    from pipelines.kfp_pipeline.steps.train import METRICS_PORT_ENV, TEAM_CONFIG_FILE_ENV

    values = {**DEMO, **settings}
    unknown = sorted(set(values) - set(DEMO))
    if unknown:
        raise DemoInputError(f"unknown demo setting {unknown[0]!r}; allowed: {', '.join(DEMO)}")
    for name, value in values.items():
        if value < (0 if name == "workers" else 1):
            raise DemoInputError(f"--{name.replace('_', '-')}={value} must be >= {0 if name == 'workers' else 1}")
    if source != "synthetic" and not Path(source).is_dir():
        raise DemoInputError(f"--source {source!r} is neither 'synthetic' nor an existing image folder")
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    workdir = Path(workdir).resolve()
    root = workdir / "pipeline-root"
    root.mkdir(parents=True, exist_ok=True)
    if team_config:
        from pipelines.jobs.team_config import TeamConfig

        TeamConfig.from_file(team_config)  # a bad file fails here, in one line, before anything runs
        # The train step runs in a subprocess that inherits this environment (kfp.local passes it on).
        os.environ[TEAM_CONFIG_FILE_ENV] = str(Path(team_config).resolve())
    else:
        os.environ.pop(TEAM_CONFIG_FILE_ENV, None)
    if metrics:
        os.environ.pop(METRICS_PORT_ENV, None)
        print("arrcoc demo: while the train step runs, each replica serves Prometheus metrics at the address the "
              "local runner prints (`[local-runner] pod ... metrics http://...`); its pods, for a scrape config, "
              "in <train task>/pytorchjob/pods.json (docs/operations.md, Watching training)", flush=True)
    else:
        os.environ[METRICS_PORT_ENV] = "0"

    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    earlier = set(root.iterdir())
    started = time.monotonic()
    with warnings.catch_warnings():
        # kfp.local says, per task, that resources and the image do not apply to subprocesses: we know.
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        try:
            arrcoc_train(
                backend="local", source=str(Path(source).resolve()) if source != "synthetic" else source, seed=seed,
                threshold=threshold, model_store=str(workdir / "models"), checkpoint_pvc="", **values)
        except RuntimeError as exc:
            failed = _ANSI.sub("", str(exc))
            raise DemoError(f"{failed} (task logs above; outputs under {root})") from None
    seconds = time.monotonic() - started
    # kfp.local makes one folder per run (<pipeline>-<time>) with one folder per task that ran. The pipeline has two
    # branches (with and without the team's data bucket, pipeline.py) whose tasks KFP names plainly and with a -2
    # suffix; only one of them ran.
    (run_dir,) = [p for p in root.iterdir() if p not in earlier and p.is_dir()]

    def task_dir(name: str) -> Path | None:
        return next((d for d in (run_dir / name, run_dir / f"{name}-2") if d.is_dir()), None)

    evaluated, trained, registered_dir = task_dir("evaluate"), task_dir("train"), task_dir("register")
    # KFP names the artifact file after the output ("report"); browsers want an .html name to render it.
    report = run_dir / "report.html"
    shutil.copyfile(evaluated / "report", report)
    registered = None
    if registered_dir is not None:
        output = json.loads((registered_dir / "executor_output.json").read_text())
        registered = Path(output["parameterValues"]["Output"])
    metrics = evaluated / "metrics"  # the evaluate step writes its logged metrics there as JSON
    return DemoResult(
        run_dir=run_dir, report=report, summary=evaluated / "summary", metrics=metrics,
        relevance_score=float(json.loads(metrics.read_text())["relevance_score"]), adapter=trained / "adapter",
        job_dir=trained / "job", registered=registered, seconds=seconds,
    )


def run(args: argparse.Namespace) -> int:
    settings = {name: getattr(args, name) for name in DEMO}
    result = run_demo(args.workdir, source=args.source, threshold=args.threshold, team_config=args.team_config,
                      seed=args.seed, metrics=not args.no_metrics, **settings)
    here = Path.cwd()

    def show(path: Path) -> str:
        return str(path.relative_to(here)) if path.is_relative_to(here) else str(path)

    lines = [
        "",
        f"arrcoc demo: pipeline finished in {result.seconds:.0f} s; relevance_score={result.relevance_score:.4f} "
        f"(threshold {args.threshold:g})",
        f"  report (open in a browser): {show(result.report)}",
        f"  summary (Markdown):         {show(result.summary)}",
        f"  metrics (JSON):             {show(result.metrics)}",
        f"  adapter:                    {show(result.adapter)}",
        f"  PyTorchJob + master log:    {show(result.job_dir)}",
    ]
    if result.registered is not None:
        lines.append(f"  registered model:           {show(result.registered)}")
    else:
        lines.append(f"  registered model:           none (relevance_score {result.relevance_score:.4f} < "
                     f"threshold {args.threshold:g})")
    print("\n".join(lines))
    sys.stdout.flush()
    return 0
