"""What the Dockerfile says, checked without building it (tests/test_image.py builds and runs the image with podman
where podman is installed)."""
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


def test_one_base_argument_whose_default_is_a_pinned_cuda_build_of_our_torch():
    assert [arg for op, arg in instructions() if op == "FROM"] == ["${BASE}"]
    (default,) = [arg.split("=", 1)[1] for op, arg in instructions() if op == "ARG" and arg.startswith("BASE=")]
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime", default)
    assert match, default
    assert match.group(1) == pin("torch")


def test_installs_only_the_wheelhouse_at_the_pins_dependencies_first():
    runs = [arg for op, arg in instructions() if op == "RUN" and "pip install" in arg]
    assert len(runs) == 2
    for run in runs:
        assert "--mount=type=bind,source=wheelhouse,target=/wheels" in run  # the wheels stay out of the layers
        assert "--no-index" in run
    assert "-c /wheels/constraints.txt -r /wheels/requirements.txt" in runs[0]
    assert "--no-deps /wheels/arrcoc_kubeflow-*.whl" in runs[1]  # a code change reinstalls only this
    constraints = (REPO / "constraints.txt").read_text().splitlines()
    for name in ("kfp", "transformers", "peft", "deepspeed", "kubeflow-training"):
        assert f"{name}=={pin(name)}" in constraints


def test_home_and_every_cache_are_on_the_pods_scratch_volume():
    from pipelines.jobs.pytorchjob import SCRATCH_MOUNT

    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(arg for op, arg in instructions() if op == "ENV")))
    for name in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "MPLCONFIGDIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR",
                 "TORCH_EXTENSIONS_DIR"):
        assert env[name] == SCRATCH_MOUNT or env[name].startswith(SCRATCH_MOUNT + "/"), name
    workdir = [arg for op, arg in instructions() if op == "WORKDIR"][-1]
    assert not workdir.startswith(SCRATCH_MOUNT)  # `python -m` puts it first on sys.path


def test_runs_as_the_non_root_uid_the_pods_ask_for():
    users = [arg for op, arg in instructions() if op == "USER"]
    assert users and users[-1] == "1000"


def test_no_entrypoint_and_the_trainer_as_exec_form_default_command():
    """kfp.local's DockerRunner passes a component's command as the container's CMD: an ENTRYPOINT would get it as
    arguments (the cluster's Kubernetes command would replace it, so the two would disagree)."""
    assert not [arg for op, arg in instructions() if op == "ENTRYPOINT"]
    cmd = [arg for op, arg in instructions() if op == "CMD"]
    assert json.loads(cmd[-1])[:3] == ["python", "-m", "trainer"]


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
