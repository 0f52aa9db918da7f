"""A replica's pod as `podman run` arguments (pipelines/image/podman.py), and `arrcoc image` without podman: both
without running podman, so they hold on every machine (tests/test_image.py runs the containers)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.image import podman
from pipelines.jobs.pytorchjob import build_pytorchjob, pytorch_container, to_manifest
from pipelines.jobs.team_config import TeamConfig

REPO = Path(__file__).resolve().parents[1]


def master(**kwargs):
    manifest = to_manifest(build_pytorchjob("pod-args", team=TeamConfig.local_default(),
                                            trainer_args=["--steps", "3"], workers=0, **kwargs))
    replica = manifest["spec"]["pytorchReplicaSpecs"]["Master"]
    return replica["template"]["spec"], pytorch_container(replica)


def option(args: list[str], name: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == name]


def test_the_builders_pod_becomes_these_podman_arguments(tmp_path):
    pod_spec, container = master(env={"OMP_NUM_THREADS": "1"})
    dirs = {v["name"]: tmp_path / v["name"] for v in podman.host_volumes(pod_spec, container)}
    assert set(dirs) == {"checkpoints", "tmp"}  # dshm is a Memory emptyDir: a tmpfs, no host folder
    args = podman.run_args(pod_spec, container, name="p", host_dirs=dirs, env={"RANK": "0"})
    assert option(args, "--user") == ["1000:1000"] and option(args, "--group-add") == ["1000"]
    assert {"--read-only", "--read-only-tmpfs=false", "--cap-drop=ALL"} <= set(args)
    assert option(args, "--security-opt") == ["no-new-privileges"]
    assert option(args, "--shm-size") == [str(1024 ** 3)]
    assert option(args, "--cpus") == ["1"] and option(args, "--memory") == [str(2 * 1024 ** 3)]
    assert sorted(option(args, "--mount")) == [
        f"type=bind,source={tmp_path / 'checkpoints'},destination=/checkpoints",
        f"type=bind,source={tmp_path / 'tmp'},destination=/tmp"]
    assert option(args, "--env") == ["RANK=0", "OMP_NUM_THREADS=1"]  # the operator's first, as it prepends them
    image = args.index(container["image"])
    assert json.loads(option(args, "--entrypoint")[0]) == container["command"] == ["python", "-m", "trainer"]
    assert args[image + 1:] == container["args"]


def test_pods_this_rehearsal_cannot_run_are_refused_in_one_line(tmp_path):
    pod_spec, container = master()
    with pytest.raises(podman.PodmanError, match="valueFrom"):
        podman.run_args(pod_spec, {**container, "env": [{"name": "X", "valueFrom": {}}]}, name="p",
                        host_dirs={"checkpoints": tmp_path, "tmp": tmp_path})
    with pytest.raises(podman.PodmanError, match="volume 'tmp' has no host folder"):
        podman.run_args(pod_spec, container, name="p", host_dirs={"checkpoints": tmp_path})


def test_volumes_are_handed_to_the_pods_group_as_the_kubelet_does(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("changing a folder's group needs root")
    shared = tmp_path / "pvc"
    (shared / "run").mkdir(parents=True)
    (shared / "run" / "staged").write_text("x")
    podman.prepare_host_dir(shared, {"persistentVolumeClaim": {"claimName": "c"}}, 1000)
    for path in (shared, shared / "run", shared / "run" / "staged"):
        assert path.stat().st_gid == 1000 and path.stat().st_mode & 0o060 == 0o060, path
    assert (shared / "run").stat().st_mode & 0o2000  # setgid: new files inherit the group
    scratch = podman.prepare_host_dir(tmp_path / "empty", {"emptyDir": {}}, 1000)
    assert scratch.stat().st_mode & 0o777 == 0o777


def test_make_image_without_podman_names_the_debian_packages_and_exits_2(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # neither podman nor debootstrap on it
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "image", "build"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "podman and debootstrap not found" in line and "apt-get install -y podman" in line
    assert "debootstrap" in line.split("apt-get install -y", 1)[1]
