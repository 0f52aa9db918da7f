"""`arrcoc compile`: regenerate every generated file kept in git.

- pipelines/kfp_pipeline/compiled/*.yaml: the compiled pipeline, one file per variant (without and with the team's
  data bucket, pipelines/kfp_pipeline/variants.py), the files users upload in the KFP UI;
- katib/base/experiment.yaml below its marker line: the trial template's PyTorchJob (pipelines/sweeps/trial_spec.py);
- katib/overlays/<team>/wired/from-team-config.yaml: the team's trial settings, from its team-config;
- pipelines/jobs/examples/*.yaml: example PyTorchJobs, rendered by `arrcoc pytorchjob render` with EXAMPLES' arguments;
- kustomize/components/monitoring/rules.yaml and manifests/monitoring/clusterrules.yaml: the alert rules
  (pipelines/monitoring/alerts.py).

Tests fail when any of them is stale (test_pipeline_compile.py, test_trial_spec.py, test_pytorchjob_builder.py,
test_monitoring_alerts.py), so after changing a component, the pipeline, the builder, the trainer's defaults, the
base team-config, the alerts or the schedules, run `arrcoc compile` (or `make compile`) and commit the diff.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from pipelines.kfp_pipeline.variants import COMPILED_DIR, VARIANTS, compiled_file

EXAMPLES_DIR = Path(__file__).parent / "jobs" / "examples"
# file name -> `arrcoc pytorchjob render` arguments (without -o).
EXAMPLES = {
    "pytorchjob-tiny.yaml": ["--name", "arrcoc-tiny", "--workers", "1",
                             "--image", "ghcr.io/arrcoc/arrcoc-trainer:0.1.0", "--",
                             "--steps", "20", "--batch-size", "8", "--eval-every", "10", "--eval-size", "32",
                             "--checkpoint-every", "5", "--seed", "0"],
}
# Fields that change with the SDK release, not with our pipeline.
VOLATILE = ("sdkVersion",)


def compile_to(directory: Path, data_bucket: bool) -> Path:
    """Compile one variant into its file in `directory`, through a temporary file beside it and a rename: a reader
    never sees half a pipeline."""
    from kfp import compiler

    from pipelines.kfp_pipeline.pipeline import build_pipeline

    path = compiled_file(data_bucket, Path(directory))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp.yaml")  # kfp wants .yaml
    os.close(fd)
    try:
        compiler.Compiler().compile(build_pipeline(data_bucket), tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the file is for everyone who checks out the repo
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def documents(text: str) -> list[dict[str, Any]]:
    """The YAML documents of a compiled pipeline (spec, platform spec) without volatile fields."""
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    for doc in docs:
        for key in VOLATILE:
            doc.pop(key, None)
    return docs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out-dir", default=str(COMPILED_DIR),
                        help="where to write the pipelines (default: pipelines/compiled, the files kept in git)")
    parser.add_argument("--pipelines-only", action="store_true",
                        help="only compile the pipelines (leave the trial template and the examples alone)")


def run(args: argparse.Namespace) -> int:
    from pipelines.cli import main
    from pipelines.sweeps import trial_spec
    from trainer.files import write_text_atomic

    for data_bucket in VARIANTS:
        path = compile_to(Path(args.out_dir), data_bucket)
        print(f"compiled the pipeline {'with' if data_bucket else 'without'} the team's data bucket -> {path}")
    if args.pipelines_only:
        return 0
    experiment = trial_spec.EXPERIMENT
    write_text_atomic(experiment, trial_spec.generate(experiment.read_text()))
    print(f"generated the trial template -> {experiment}")
    head = trial_spec.split(experiment.read_text())[1]
    for team in trial_spec.team_overlays():
        path = trial_spec.OVERLAYS / team / trial_spec.TEAM_PATCH
        write_text_atomic(path, trial_spec.team_patch(head, trial_spec.rendered_team_config(team)))
        print(f"generated {team}'s trial settings -> {path}")
    for name, argv in EXAMPLES.items():
        path = EXAMPLES_DIR / name
        before, after = argv[:argv.index("--")], argv[argv.index("--"):]
        code = main(["pytorchjob", "render", *before, "-o", str(path), *after])
        if code:
            return code
        print(f"rendered the example PyTorchJob -> {path}")
    from pipelines.monitoring import alerts

    for path, text in alerts.generated().items():
        write_text_atomic(path, text)
        print(f"generated the alert rules -> {path}")
    return 0
