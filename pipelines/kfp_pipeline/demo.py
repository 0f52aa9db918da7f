"""`arrcoc demo`: the whole pipeline on this machine, offline, in a few minutes (what `make demo` runs).

The variant of the pipeline the team-config calls for (with or without its data bucket), run by kfp.local's
SubprocessRunner in this virtual environment with backend "local": the train step builds the PyTorchJob a cluster
would get and the local runner starts its replicas as processes. Outputs go under --workdir (docs/pipeline.md).
With --image (`make demo-image`), kfp.local's DockerRunner runs each step in the trainer image instead, through
podman's Docker-compatible API, as the KFP launcher runs it (docs/image.md).
"""
from __future__ import annotations

import argparse
import contextlib
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
# Measured on 2 shared cores (docs/pipeline.md): ~2 minutes, relevance_score ~0.63 against DEFAULT_THRESHOLD 0.4;
# 80 steps reached only ~0.36. An evaluation every 25 steps draws the report's curve (64 scenes each: ~1 s).
DEMO = {"steps": 150, "batch_size": 16, "eval_every": 25, "train_size": 1024, "eval_size": 64, "workers": 1,
        "report_samples": 6}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
MODEL_STORE_IN_ROOT = "model-store"  # --image: the steps' containers see only the pipeline root


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
    model_card: str  # the pipeline's output: the registered model's card, or why nothing was registered
    pipeline: str  # the variant that ran
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
    parser.add_argument("--image", action="store_true",
                        help="run every step in the trainer image (kfp.local.DockerRunner on podman; make image first)")
    for name, value in DEMO.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=value, help=f"(default: {value})")


def run_demo(workdir: str | Path, *, source: str = "synthetic", threshold: float | None = None,
             team_config: str | None = None, seed: int = 0, quiet: bool = False, metrics: bool = True,
             image: bool = False, **settings: int) -> DemoResult:
    """Run the pipeline with kfp.local; settings override DEMO (steps, batch_size, ...). metrics: the trainer's
    Prometheus exporter; image: every step in the trainer image (DockerRunner against podman's Docker API), else
    subprocesses of this venv."""
    import kfp.local

    from pipelines.jobs.team_config import TeamConfig
    from pipelines.kfp_pipeline.pipeline import DEFAULT_THRESHOLD, build_pipeline
    from pipelines.kfp_pipeline.steps.prepare_data import DataSource
    from pipelines.kfp_pipeline.steps.train import METRICS_PORT_ENV, TEAM_CONFIG_FILE_ENV
    from pipelines.kfp_pipeline.variants import pipeline_name

    values = {**DEMO, **settings}
    unknown = sorted(set(values) - set(DEMO))
    if unknown:
        raise DemoInputError(f"unknown demo setting {unknown[0]!r}; allowed: {', '.join(DEMO)}")
    for name, value in values.items():
        if value < (0 if name == "workers" else 1):
            raise DemoInputError(f"--{name.replace('_', '-')}={value} must be >= {0 if name == 'workers' else 1}")
    parsed = DataSource.parse(source, label="--source")
    if parsed.vqa:  # the demo trains the tiny model of the scenes task
        raise DemoInputError(f"--source {source}: a VQA source needs a Qwen-VL --base-model; the demo takes "
                             f"synthetic or an image folder")
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    # A bad file fails here, in one line, before anything runs; its dataBucket picks the pipeline variant.
    team = TeamConfig.from_file(team_config) if team_config else TeamConfig.local_default()
    pipeline = build_pipeline(bool(team.data_bucket))
    workdir = Path(workdir).resolve()
    root = workdir / "pipeline-root"
    root.mkdir(parents=True, exist_ok=True)
    if image and parsed.folder:
        raise DemoInputError(f"--source {source}: with --image the steps see only the pipeline root; use synthetic")
    # With --image the steps' containers see the pipeline root alone (DockerRunner mounts nothing else), so the
    # model store and the team-config file live there.
    model_store = root / MODEL_STORE_IN_ROOT if image else workdir / "models"
    step_env: dict[str, str] = {}
    if team_config:
        path = Path(team_config).resolve()
        if image:
            path = Path(shutil.copyfile(path, root / "team-config.yaml"))
        step_env[TEAM_CONFIG_FILE_ENV] = str(path)
        # The train step runs in a subprocess that inherits this environment (kfp.local passes it on).
        os.environ[TEAM_CONFIG_FILE_ENV] = str(path)
    else:
        os.environ.pop(TEAM_CONFIG_FILE_ENV, None)
    if metrics:
        os.environ.pop(METRICS_PORT_ENV, None)
        print("arrcoc demo: while the train step runs, each replica serves Prometheus metrics at the address the "
              "local runner prints (`[local-runner] pod ... metrics http://...`); its pods, for a scrape config, "
              "in <train task>/pytorchjob/pods.json (docs/operations.md, Watching training)", flush=True)
    else:
        os.environ[METRICS_PORT_ENV] = "0"
        step_env[METRICS_PORT_ENV] = "0"  # the image's steps get only what the runner passes them

    with contextlib.ExitStack() as stack:
        if image:
            runner = stack.enter_context(docker_runner(root, step_env))
        else:
            runner = kfp.local.SubprocessRunner(use_venv=False)
        kfp.local.init(runner=runner, pipeline_root=str(root))
        outputs, run_dir, seconds = _run_pipeline(pipeline, root, parsed, seed, threshold, model_store, values)
    # KFP names the artifact file after the output ("report"); browsers want an .html name to render it.
    report = run_dir / "report.html"
    shutil.copyfile(outputs["report"].path, report)
    registered = None
    if (run_dir / "register").is_dir():
        output = json.loads((run_dir / "register" / "executor_output.json").read_text())
        registered = Path(output["parameterValues"]["path"])
    metrics = Path(outputs["metrics"].path)  # the evaluate step writes its logged metrics there as JSON
    return DemoResult(
        run_dir=run_dir, report=report, summary=run_dir / "evaluate" / "summary", metrics=metrics,
        relevance_score=float(json.loads(metrics.read_text())["relevance_score"]),
        adapter=Path(outputs["adapter"].path), job_dir=run_dir / "train" / "job", registered=registered,
        model_card=outputs["model_card"], pipeline=pipeline_name(bool(team.data_bucket)), seconds=seconds,
    )


def _run_pipeline(pipeline, root: Path, parsed, seed: int, threshold: float, model_store: Path, values: dict):
    earlier = set(root.iterdir())
    started = time.monotonic()
    with warnings.catch_warnings():
        # kfp.local says, per task, that resources and the image do not apply to subprocesses: we know.
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        try:
            outputs = pipeline(
                backend="local", source=str(parsed.folder.resolve()) if parsed.folder else str(parsed), seed=seed,
                threshold=threshold, model_store=str(model_store), checkpoint_pvc="", **values).outputs
        except RuntimeError as exc:
            failed = _ANSI.sub("", str(exc))
            raise DemoError(f"{failed} (task logs above; outputs under {root})") from None
    seconds = time.monotonic() - started
    (run_dir,) = [p for p in root.iterdir() if p not in earlier and p.is_dir()  # <pipeline>-<time>, a task each
                  and p.name != MODEL_STORE_IN_ROOT]
    return outputs, run_dir, seconds


@contextlib.contextmanager
def docker_runner(root: Path, env: dict[str, str]):
    """kfp.local.DockerRunner against podman's Docker API, the steps as the image's uid 1000 (as on the cluster,
    where pipeline.py asks for runAsNonRoot)."""
    import kfp.local

    from pipelines.image import podman
    from pipelines.kfp_pipeline.components import BASE_IMAGE

    podman.require("podman")
    if not podman.image_exists(BASE_IMAGE):
        raise DemoInputError(f"--image: {BASE_IMAGE} is not in podman's store (nothing is pulled here): make image")
    # The pipeline root is the steps' shared storage, written by this (root) process and by the steps' uid 1000:
    # kfp.local creates each task's folders here before its container starts, so they must be open to that uid.
    previous_umask = os.umask(0)
    root.chmod(0o777)
    try:
        with podman.docker_api() as docker_host:
            os.environ["DOCKER_HOST"] = docker_host
            try:
                yield kfp.local.DockerRunner(environment=env) if env else kfp.local.DockerRunner()
            finally:
                os.environ.pop("DOCKER_HOST", None)
    finally:
        os.umask(previous_umask)


def run(args: argparse.Namespace) -> int:
    settings = {name: getattr(args, name) for name in DEMO}
    result = run_demo(args.workdir, source=args.source, threshold=args.threshold, team_config=args.team_config,
                      seed=args.seed, metrics=not args.no_metrics, image=args.image, **settings)
    here = Path.cwd()

    def show(path: Path) -> str:
        return str(path.relative_to(here)) if path.is_relative_to(here) else str(path)

    lines = [
        "",
        f"arrcoc demo: pipeline {result.pipeline} finished in {result.seconds:.0f} s; "
        f"relevance_score={result.relevance_score:.4f} (threshold {args.threshold:g})",
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
