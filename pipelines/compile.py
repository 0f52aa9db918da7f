"""`arrcoc compile`: write the compiled pipeline(s) to pipelines/compiled/, the files users upload in the KFP UI.

The files are kept in git; tests/test_pipeline_compile.py compiles afresh and fails when they are stale, so
after changing a component or the pipeline run `arrcoc compile` (or `make compile`) and commit the diff.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

COMPILED_DIR = Path(__file__).parent / "compiled"
# file name -> "module:function" of a @dsl.pipeline; one line per pipeline we ship.
PIPELINES = {"arrcoc_train.yaml": "pipelines.pipeline:arrcoc_train"}
# Fields that change with the SDK release, not with our pipeline.
VOLATILE = ("sdkVersion",)


def _pipeline(ref: str):
    import importlib

    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def compile_to(path: Path, ref: str) -> Path:
    """Compile into a temporary file beside `path`, then rename: a reader never sees half a pipeline."""
    from kfp import compiler

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp.yaml")  # kfp wants .yaml
    os.close(fd)
    try:
        compiler.Compiler().compile(_pipeline(ref), tmp)
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
                        help="where to write (default: pipelines/compiled, the files kept in git)")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out_dir)
    for name, ref in PIPELINES.items():
        path = compile_to(out / name, ref)
        print(f"compiled {ref} -> {path}")
    return 0
