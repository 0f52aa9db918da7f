"""The trainer image cannot be built here (no Docker engine): check what can be checked offline."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "trainer" / "Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    rows = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(row.split(None, 1)[0].upper(), row.split(None, 1)[1]) for row in rows]


def pin(name: str) -> str:
    for dep in PYPROJECT["project"]["dependencies"]:
        if dep.split("==")[0].lower() == name:
            return dep.split("==")[1]
    raise AssertionError(f"{name} is not pinned in pyproject.toml")


def test_base_image_is_a_pinned_cuda_build_of_our_torch():
    base = [arg for op, arg in instructions() if op == "FROM"]
    assert len(base) == 1
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime", base[0])
    assert match, base[0]
    assert match.group(1) == pin("torch")


def test_installs_the_pinned_set_without_touching_torch():
    run = " ".join(arg for op, arg in instructions() if op == "RUN")
    assert "-c /tmp/constraints.txt ." in run and "grep -v '^torch=='" in run
    constraints = (REPO / "constraints.txt").read_text().splitlines()
    for name in ("kfp", "transformers", "peft", "deepspeed", "kubeflow-training"):
        assert f"{name}=={pin(name)}" in constraints


def test_runs_as_the_non_root_uid_the_pods_ask_for():
    users = [arg for op, arg in instructions() if op == "USER"]
    assert users and users[-1] == "1000"


def test_entrypoint_is_exec_form_python_module():
    entry = [arg for op, arg in instructions() if op == "ENTRYPOINT"]
    assert json.loads(entry[-1]) == ["python", "-m", "trainer"]


def test_every_image_reference_uses_the_project_version():
    """Manifests, Katib templates and the builder must all run the image this version builds."""
    version = PYPROJECT["project"]["version"]
    refs = set()
    for path in [*REPO.glob("katib/**/*.yaml"), *REPO.glob("pipelines/**/*.py"), *REPO.glob("pipelines/**/*.yaml")]:
        refs |= set(re.findall(r"[\w./-]*arrcoc-trainer:[\w.\-]+", path.read_text()))
    assert refs, "no trainer image reference found"
    assert refs == {f"ghcr.io/arrcoc/arrcoc-trainer:{version}"}


def test_hadolint_passes():
    hadolint = Path(sys.executable).with_name("hadolint")
    result = subprocess.run([str(hadolint), "--config", str(REPO / ".hadolint.yaml"), str(DOCKERFILE)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
