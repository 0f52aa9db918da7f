"""The pipeline's compiled variants: one for teams without a data bucket, one for teams with one (team-config
dataBucket), chosen when compiling (docs/pipeline.md "Variants"). Their names in KFP and their compiled files;
nothing here imports kfp, so `arrcoc pipeline` can pick a team's variant without building the pipeline."""
from __future__ import annotations

from pathlib import Path

COMPILED_DIR = Path(__file__).parent / "compiled"
BASE_NAME = "arrcoc-train"
VARIANTS = (False, True)  # data_bucket


def pipeline_name(data_bucket: bool) -> str:
    return f"{BASE_NAME}-data-bucket" if data_bucket else BASE_NAME


def compiled_file(data_bucket: bool, directory: Path = COMPILED_DIR) -> Path:
    return directory / (pipeline_name(data_bucket).replace("-", "_") + ".yaml")


def variant_of(name: str) -> bool | None:
    """Whether the pipeline named `name` is the data-bucket variant; None for a pipeline that is not ours."""
    return {pipeline_name(v): v for v in VARIANTS}.get(name)
