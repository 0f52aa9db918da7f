"""The trainer image, run as the cluster runs it: podman here plays the kubelet (no cluster, no Docker engine).

Every container takes its settings from what the PyTorchJob builder (or the Katib trial template) emits for a
replica: command, args, env, securityContext (uid 1000, read-only root, no capabilities), limits, volumes and
their mount paths (pipelines/image/podman.py run_args). The image must be built from this checkout (`make image`;
`make test-image` builds it and runs these); otherwise these tests skip and say why, or fail under
ARRCOC_IMAGE_TESTS=required (what `make test-image` sets).
"""
from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path

import pytest

from pipelines.image import build, podman
from pipelines.jobs.local import Chaos, run_local
from pipelines.jobs.pytorchjob import DEFAULT_IMAGE, build_pytorchjob, pytorch_container, to_manifest
from pipelines.jobs.team_config import TeamConfig
from pipelines.sweeps.collector import METRICS_FILE, kubelet_expand, wrap_primary_container
from pipelines.sweeps.experiment import (
    DEFAULT_METRICS_FORMAT,
    collect_metrics,
    load_manifest,
    parse_experiment,
    render_trial,
)
from pipelines.sweeps.search import apply_overrides
from trainer.checkpoint import complete_checkpoints

pytestmark = [pytest.mark.image, pytest.mark.skipif(bool(podman.missing("podman")), reason=(
    f"image tests skipped: podman is not installed (apt-get install -y {' '.join(podman.DEBIAN_PACKAGES)}; "
    f"then make test-image)"))]
REPO = Path(__file__).resolve().parents[1]
ARGS = ["--steps", "16", "--batch-size", "8", "--eval-every", "8", "--eval-size", "32", "--checkpoint-every", "4",
        "--log-every", "1", "--seed", "3"]


@pytest.fixture(scope="module")
def image() -> str:
    label = build.image_digest_label()
    problem = (f"{build.LOCAL_IMAGE} is not built" if label is None else
               f"{build.LOCAL_IMAGE} was built from other sources than this checkout" if label != build.source_digest()
               else None)
    if problem:
        if os.environ.get("ARRCOC_IMAGE_TESTS") == "required":
            pytest.fail(f"{problem} (make image)")
        pytest.skip(f"image tests skipped: {problem} (make image, or make test-image to build and run them)")
    return DEFAULT_IMAGE


def job(name: str, args: list[str] = ARGS, workers: int = 0) -> dict:
    # OMP_NUM_THREADS=1 in both modes: the same float reductions, so the same numbers.
    return to_manifest(build_pytorchjob(name, team=TeamConfig.local_default(), trainer_args=args, workers=workers,
                                        nproc_per_node="1", env={"OMP_NUM_THREADS": "1"}))


def one_node_env(master: str = "localhost") -> dict[str, str]:
    """What the Training Operator injects into the Master of a one-replica job (pipelines/jobs/local.py has the
    contract): the plain variables and torchrun's PET_* ones."""
    return {"PYTHONUNBUFFERED": "1", "MASTER_ADDR": master, "PET_MASTER_ADDR": master, "MASTER_PORT": "23456",
            "PET_MASTER_PORT": "23456", "WORLD_SIZE": "1", "RANK": "0", "PET_NODE_RANK": "0",
            "PET_NPROC_PER_NODE": "1", "PET_NNODES": "1"}


class Pod:
    """One replica's pod: its container, run with podman from the manifest's settings; volumes are folders here."""

    def __init__(self, manifest: dict, volumes: Path, rtype: str = "Master", container: dict | None = None,
                 extra_volumes: tuple[dict, ...] = ()):
        replica = manifest["spec"]["pytorchReplicaSpecs"][rtype]
        self.pod_spec = dict(replica["template"]["spec"])
        self.pod_spec["volumes"] = [*self.pod_spec["volumes"], *extra_volumes]
        self.container = container or pytorch_container(replica)
        self.volumes = volumes
        self.name = f"arrcoc-test-{uuid.uuid4().hex[:8]}"
        self.started: list[str] = []

    def host_dirs(self) -> dict[str, Path]:
        fs_group = podman.security(self.pod_spec, self.container)[2]
        return {v["name"]: podman.prepare_host_dir(self.volumes / v["name"], v, fs_group)
                for v in podman.host_volumes(self.pod_spec, self.container)}

    def start(self, env: dict[str, str] | None = None) -> str:
        name = f"{self.name}-{len(self.started)}"
        args = podman.run_args(self.pod_spec, self.container, name=name, host_dirs=self.host_dirs(),
                               env=env or one_node_env())
        podman.podman("run", "--detach", *args)
        self.started.append(name)
        return name

    def wait(self, name: str, timeout: float = 600) -> int:
        return int(podman.podman("wait", name, timeout=timeout).stdout.strip())

    def logs(self, name: str) -> str:
        result = podman.podman("logs", name, check=False)
        return result.stdout + result.stderr

    def wait_for(self, pattern: str, read, timeout: float = 300) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if match := re.search(pattern, read()):
                return match
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} within {timeout:g} s; last output:\n{read()[-3000:]}")

    def remove(self) -> None:
        for name in self.started:
            podman.podman("rm", "--force", "--ignore", name, check=False)


@pytest.fixture
def pods():
    made: list[Pod] = []
    yield made
    for pod in made:
        pod.remove()


def test_the_image_holds_exactly_the_pinned_versions(image):
    freeze = podman.podman("run", "--rm", "--user", "1000:1000", "--read-only", image, "python", "-c",
                           "import importlib.metadata as m; print('\\n'.join(sorted(f'{d.name}=={d.version}' "
                           "for d in m.distributions())))").stdout.split()
    pins = {_norm(line.split("==")[0]): line.split("==")[1]
            for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line}
    installed = {_norm(n): v for n, v in (line.split("==") for line in freeze)}
    project = _norm(build.PROJECT["name"])
    assert installed.pop(project) == build.VERSION
    # Debian's own pip, and wheel beside it (python3-pip's), are the only distributions that are not ours.
    assert {n for n in installed if n not in pins} <= {"pip", "wheel"}, installed
    assert {n: v for n, v in installed.items() if n in pins and pins[n] != v} == {}
    assert installed["torch"].endswith("+cpu")  # the local CPU wheel, never a CUDA build
    assert installed["setuptools"] == pins["setuptools"]  # torch requires it at run time; pip freeze hides it


def test_the_trainer_trains_in_the_pod_and_checkpoints_to_its_volume(image, pods, tmp_path):
    pods.append(pod := Pod(job("img-train"), tmp_path / "volumes"))
    assert {"--read-only", "--cap-drop=ALL"} <= set(podman.run_args(
        pod.pod_spec, pod.container, name="x", host_dirs=pod.host_dirs()))
    name = pod.start()
    assert pod.wait(name) == 0, pod.logs(name)[-3000:]
    out = tmp_path / "volumes" / "checkpoints" / "img-train"
    assert [c.name for c in complete_checkpoints(out / "checkpoints")][-1] == "step-00000016"
    assert json.loads((out / "metrics.json").read_text())["step"] == 16
    assert (out / "metrics.json").stat().st_uid == 1000  # written by the pod's user
    # Caches and HOME went to the pod's /tmp emptyDir, never to the (read-only) image.
    assert "Read-only file system" not in pod.logs(name)


def test_sigterm_checkpoints_exits_143_and_a_restart_resumes_exactly(image, pods, tmp_path):
    args = [*ARGS[:-2], "--seed", "3"]
    pods.append(reference := Pod(job("img-whole", args), tmp_path / "volumes"))
    pods.append(pod := Pod(job("img-term", args), tmp_path / "volumes"))
    whole = reference.start()
    first = pod.start()
    pod.wait_for(r"step 6/16", lambda: pod.logs(first))
    podman.podman("kill", "--signal", "TERM", first)  # what the kubelet sends PID 1 (python) on pod deletion
    assert pod.wait(first) == 143
    stopped = int(re.search(r"stopping on signal 15 after step (\d+)", pod.logs(first)).group(1))
    out = tmp_path / "volumes" / "checkpoints"
    assert complete_checkpoints(out / "img-term" / "checkpoints")[-1].name == f"step-{stopped:08d}"
    second = pod.start()  # the operator's new pod, on the same checkpoint volume
    assert pod.wait(second) == 0, pod.logs(second)[-3000:]
    assert f"at step {stopped}" in pod.logs(second)  # resumed from the signal's checkpoint: no step lost
    assert reference.wait(whole) == 0
    assert _metrics(out / "img-term") == _metrics(out / "img-whole")


def test_a_katib_trial_in_the_image_checkpoints_through_the_prestop_hook(image, pods, tmp_path):
    """The trial's Master as Katib v0.19's webhook leaves it (StdOut collector: `sh -c "... 1>metrics.log 2>&1 &&
    echo completed > ..."`, with the metrics volume it mounts: inject_webhook.go mutateMetricsCollectorVolume),
    stopped as the kubelet stops a pod: the preStop exec hook, then SIGTERM to PID 1 (the shell)."""
    doc, _ = apply_overrides(load_manifest(REPO / "katib" / "base" / "experiment.yaml"), sets=[
        "steps=3000", "eval_every=5", "eval_size=16", "batch_size=8", "checkpoint_every=1000", "log_every=1"])
    experiment = parse_experiment(doc)
    trial = render_trial(experiment, "trial-img", {p.name: "50" for p in experiment.parameters})
    master = pytorch_container(trial["spec"]["pytorchReplicaSpecs"]["Master"])
    wrapped = wrap_primary_container(master)
    env = {**one_node_env(), **{e["name"]: e["value"] for e in wrapped.get("env") or []}}
    wrapped["command"] = [kubelet_expand(a, env) for a in wrapped["command"]]
    wrapped["args"] = [kubelet_expand(a, env) for a in wrapped["args"]]
    metrics_dir = os.path.dirname(METRICS_FILE)
    wrapped["volumeMounts"] = [*wrapped["volumeMounts"], {"name": "metrics-volume", "mountPath": metrics_dir}]
    pods.append(pod := Pod(trial, tmp_path / "volumes", container=wrapped,
                           extra_volumes=({"name": "metrics-volume", "emptyDir": {}},)))
    name = pod.start(env=one_node_env())
    log = tmp_path / "volumes" / "metrics-volume" / "metrics.log"

    def read() -> str:
        return log.read_text() if log.exists() else ""

    pod.wait_for(r"relevance_score=[\s\S]*step \d+/3000", read)  # an evaluation, and training after it
    hook: list[str] = []
    grace = trial["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"].get(
        "terminationGracePeriodSeconds", 30)
    code = podman.stop(name, wrapped, grace, log=hook)
    assert code == 0, hook  # the hook returned by itself: no FailedPreStopHook (137 when it outlives the pod)
    saved = re.search(r"checkpoint (\S+) complete", "".join(hook))
    assert saved, hook
    stopped = int(re.search(r"stopping on signal 15 after step (\d+)", read()).group(1))
    out = tmp_path / "volumes" / "checkpoints" / "trial-img"
    assert complete_checkpoints(out / "checkpoints")[-1].name == f"step-{stopped:08d}"
    assert not list(log.parent.glob("*.pid"))  # the shell did not mark the trial completed
    names = experiment.objective.metric_names
    found = collect_metrics(read(), names, [DEFAULT_METRICS_FORMAT])
    assert {n for _, n, _ in found} == set(names), found
    # trainer/torchrun.py: torchrun alone exits 1 here, which restartPolicy ExitCode would never retry
    assert pod.wait(name) == 143


def test_replicas_as_containers_match_the_process_mode_and_survive_a_sigkill(image, tmp_path):
    processes = run_local(job("img-job", workers=1), tmp_path / "process", timeout=600, log_stream=None)
    assert processes.succeeded, processes.final
    chaos = Chaos("worker-0", log_pattern=r"^\[rank 1\] step 10/")
    containers = run_local(job("img-job", workers=1), tmp_path / "container", timeout=600, log_stream=None,
                           chaos=[chaos], containers=True)
    assert containers.succeeded, (containers.final, containers.master_log.read_text()[-3000:])
    assert 137 in containers.exit_codes["worker-0"] and containers.restarts["worker-0"] == 1  # ExitCode retried
    assert "resumed from" in containers.master_log.read_text()
    # The worker reached the master by the operator's service name, on the job's podman network.
    assert _metrics(tmp_path / "container" / "volumes" / "checkpoints" / "img-job") == \
        _metrics(tmp_path / "process" / "volumes" / "checkpoints" / "img-job")


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_pipeline_step_runs_in_the_image_with_kfps_docker_runner(image, tmp_path):
    """`arrcoc demo --image`: kfp.local.DockerRunner starts each step as a container of the compiled pipeline's
    base_image through podman's Docker API, as the KFP launcher runs it (the gate open: register runs); then the
    closed gate's not-registered component alone."""
    import kfp.local

    from pipelines.kfp_pipeline.components.register import not_registered
    from pipelines.kfp_pipeline.demo import docker_runner, run_demo

    result = run_demo(tmp_path / "demo", image=True, threshold=0.0, steps=4, eval_every=4, train_size=32,
                      eval_size=16, report_samples=1)
    tasks = {p.name for p in result.run_dir.iterdir() if p.is_dir()}
    assert {"prepare-data", "train", "evaluate", "register"} <= tasks, tasks
    for task in ("prepare-data", "train", "evaluate", "register"):  # written by the image's user, not this process
        assert (result.run_dir / task / "executor_output.json").stat().st_uid == 1000, task
    assert result.registered is not None and any(result.registered.rglob("adapter_config.json"))
    root = tmp_path / "single"
    root.mkdir()
    with docker_runner(root, {}) as runner:
        kfp.local.init(runner=runner, pipeline_root=str(root))
        task = not_registered(value=0.1, threshold=0.5, gate_metric="relevance_score")
    assert task.output.startswith("Not registered: relevance_score 0.1000 is below the threshold 0.5")
