"""The local PyTorchJob rehearsal: operator env, replica-prefixed logs, restart policies, backoffLimit,
deadlines, the chaos hook of the preemption drill, and `arrcoc pytorchjob run --local`.

Replicas run tiny `python -c` programs in place of the trainer (one test uses torch.distributed with gloo, one
slow test runs the real trainer), built by the real builder so the manifests are the ones a cluster gets.
"""
from __future__ import annotations

import dataclasses
import io
import json
import signal
import sys
from pathlib import Path

import pytest
import yaml

from pipelines import cli
from pipelines.jobs.local import Chaos, LocalJobResult, exit_code, retryable, run_local
from pipelines.jobs.pytorchjob import ManifestError, build_pytorchjob, to_manifest
from pipelines.jobs.team_config import TeamConfig

REPO = Path(__file__).resolve().parents[1]
GUARD = 120  # seconds: a hung test fails instead of blocking the suite; no test waits this long when passing

ENV_KEYS = ["PYTHONUNBUFFERED", "MASTER_ADDR", "PET_MASTER_ADDR", "MASTER_PORT", "PET_MASTER_PORT", "WORLD_SIZE",
            "RANK", "PET_NODE_RANK", "PET_NPROC_PER_NODE", "PET_NNODES", "LOCAL_RANK", "FOO", "CKPT", "POD_IP"]
PRINT_ENV = f"""
import json, os, sys
print("ENV " + json.dumps({{"env": {{k: os.environ.get(k) for k in {ENV_KEYS!r}}}, "argv": sys.argv[1:],
                           "python": sys.executable}}))
print("hello from rank " + os.environ["RANK"])
"""
# Exits with CODE on its first attempt (the marker lives on the checkpoint volume, which outlives processes).
FIRST_ATTEMPT_EXITS = """
import os, sys, time
out = sys.argv[sys.argv.index("--out") + 1]
os.makedirs(out, exist_ok=True)
marker = os.path.join(out, "tried-" + os.environ["RANK"])
if os.environ["RANK"] == "0" and not os.path.exists(marker):
    open(marker, "w").close()
    print("failing with", CODE, flush=True)
    if CODE >= 128:
        os.kill(os.getpid(), CODE - 128)
    sys.exit(CODE)
time.sleep(0.3)
print("finished", flush=True)
"""
# A trainer in miniature: checkpoint on SIGTERM and exit 128 + 15, resume when a checkpoint exists.
CHECKPOINTS_ON_SIGTERM = """
import os, signal, sys, time
out = sys.argv[sys.argv.index("--out") + 1]
os.makedirs(out, exist_ok=True)
ckpt = os.path.join(out, "checkpoint-" + os.environ["RANK"])
def on_term(signum, frame):
    open(ckpt, "w").close()
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, on_term)
if os.path.exists(ckpt):
    print("resumed", flush=True)
for step in range(1, 6):
    print(f"step={step}", flush=True)
    time.sleep(0.1)
"""
GLOO_ALL_REDUCE = """
import sys, time, torch, torch.distributed as dist
dist.init_process_group("gloo")  # env://: MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK as the operator injects
for step in range(1, 6):
    t = torch.ones(1) * (dist.get_rank() + 1)
    dist.all_reduce(t)
    print(f"step={step} sum={t.item():g}", flush=True)
    time.sleep(0.2)
dist.destroy_process_group()
"""


def manifest(script: str, *, workers: int = 1, policy: str | None = None, backoff: int = 3, nproc: str | None = None,
             env: dict | None = None, deadline: int | None = None, name: str = "rehearsal") -> dict:
    team = dataclasses.replace(TeamConfig.local_default(), backoff_limit=backoff)
    m = to_manifest(build_pytorchjob(name, team=team, workers=workers, nproc_per_node=nproc, env=env,
                                     active_deadline_seconds=deadline))
    for rspec in m["spec"]["pytorchReplicaSpecs"].values():
        rspec["template"]["spec"]["containers"][0]["command"] = ["python", "-c", script]
        if policy:
            rspec["restartPolicy"] = policy
    return m


def run(m: dict, workdir: Path, **kwargs) -> tuple[LocalJobResult, str]:
    stream = io.StringIO()
    result = run_local(m, workdir, timeout=kwargs.pop("timeout", GUARD), log_stream=stream, **kwargs)
    return result, stream.getvalue()


def env_report(log: Path) -> dict:
    line = next(line for line in log.read_text().splitlines() if line.startswith("ENV "))
    return json.loads(line[4:])


def test_operator_env_is_injected_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "5")  # an outer launcher's variable must not leak in
    m = manifest(PRINT_ENV, workers=2, env={"FOO": "bar", "CKPT": "/checkpoints/extra"})
    result, _ = run(m, tmp_path)
    assert result.succeeded
    volume = (tmp_path / "volumes" / "checkpoints").resolve()
    reports = {name: env_report(path) for name, path in result.logs.items()}
    assert set(reports) == {"master-0", "worker-0", "worker-1"}
    ports = {r["env"]["MASTER_PORT"] for r in reports.values()}
    assert len(ports) == 1 and int(ports.pop()) > 0
    pod_ips = {r["env"]["POD_IP"] for r in reports.values()}
    assert len(pod_ips) == 3 and all(ip.startswith("127.") and ip != "127.0.0.1" for ip in pod_ips)
    for name, rank in (("master-0", "0"), ("worker-0", "1"), ("worker-1", "2")):
        env = reports[name]["env"]
        assert env == {
            "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1", "PET_MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": env["MASTER_PORT"], "PET_MASTER_PORT": env["MASTER_PORT"], "WORLD_SIZE": "3",
            "RANK": rank, "PET_NODE_RANK": rank, "PET_NPROC_PER_NODE": "1", "PET_NNODES": "3", "LOCAL_RANK": None,
            "FOO": "bar", "CKPT": f"{volume}/extra",  # mount paths in env values point at the local volume
            "POD_IP": env["POD_IP"],  # each replica its own loopback address, as each pod its own IP
        }
        assert reports[name]["argv"] == ["--out", f"{volume}/rehearsal", "--metrics-port", "9400"]
        assert reports[name]["python"] == sys.executable


def test_pods_carry_the_operators_labels_and_their_addresses_are_listed(tmp_path: Path) -> None:
    """pods.json is what a Prometheus pod discovery of this job would see (kubeflow/trainer v1.9.2 createNewPod)."""
    result, stream = run(manifest(PRINT_ENV, workers=1), tmp_path)
    pods = {p["metadata"]["name"]: p for p in json.loads((tmp_path / "pods.json").read_text())}
    assert set(pods) == {"rehearsal-master-0", "rehearsal-worker-0"}
    master, worker = pods["rehearsal-master-0"], pods["rehearsal-worker-0"]
    assert master["metadata"]["labels"] == {
        "arrcoc.dev/team": "local", "arrcoc.dev/run-id": "rehearsal",
        "training.kubeflow.org/operator-name": "pytorchjob-controller", "training.kubeflow.org/job-name": "rehearsal",
        "training.kubeflow.org/replica-type": "master", "training.kubeflow.org/replica-index": "0",
        "training.kubeflow.org/job-role": "master"}
    assert worker["metadata"]["labels"]["training.kubeflow.org/replica-type"] == "worker"
    assert "training.kubeflow.org/job-role" not in worker["metadata"]["labels"]
    assert [p["status"]["phase"] for p in pods.values()] == ["Succeeded", "Succeeded"]
    assert {p["status"]["podIP"] for p in pods.values()} == {env_report(log)["env"]["POD_IP"]
                                                             for log in result.logs.values()}
    assert {"name": "metrics", "containerPort": 9400} in master["spec"]["containers"][0]["ports"]
    ip = master["status"]["podIP"]
    assert f"[local-runner] pod rehearsal-master-0 (master-0) at {ip}: metrics http://{ip}:9400/metrics" in stream


@pytest.mark.parametrize("nproc, world_size", [("2", "4"), ("auto", "2")])
def test_world_size_counts_processes_per_node(tmp_path: Path, nproc: str, world_size: str) -> None:
    result, _ = run(manifest(PRINT_ENV, workers=1, nproc=nproc), tmp_path)
    env = env_report(result.master_log)["env"]
    assert (env["WORLD_SIZE"], env["PET_NPROC_PER_NODE"], env["PET_NNODES"]) == (world_size, nproc, "2")


def test_logs_are_replica_prefixed_and_kept_per_replica(tmp_path: Path) -> None:
    result, stream = run(manifest(PRINT_ENV, workers=1), tmp_path)
    assert "[master-0] hello from rank 0" in stream and "[worker-0] hello from rank 1" in stream
    assert result.master_log == result.logs["master-0"]
    assert "hello from rank 1" in result.logs["worker-0"].read_text()
    assert "[worker-0]" not in result.logs["worker-0"].read_text()  # files hold what the process printed
    assert [c["type"] for c in result.conditions] == ["Created", "Running", "Succeeded"]
    assert result.conditions[-1]["status"] == "True" and result.conditions[1]["status"] == "False"


def test_restart_after_sigkill_of_a_worker_in_a_gloo_group(tmp_path: Path) -> None:
    chaos = Chaos("worker-0", signal.SIGKILL, log_pattern=r"^step=2 ")
    result, stream = run(manifest(GLOO_ALL_REDUCE, workers=1), tmp_path, chaos=[chaos])
    assert result.succeeded, result.conditions
    assert result.exit_codes["worker-0"] == [137, 0]
    assert result.exit_codes["master-0"][-1] == 0 and len(result.exit_codes["master-0"]) == 2
    assert result.restarts == {"master-0": 1, "worker-0": 1}
    assert "Restarting: PyTorchJob rehearsal is restarting because 1 Worker replica(s) failed" in stream
    assert "step=5 sum=3" in result.master_log.read_text()  # the new group all-reduces again
    [event] = result.chaos
    assert event.replica == "worker-0" and event.signal == signal.SIGKILL
    assert event.recovery_seconds is not None and event.recovery_seconds > 0


def test_restart_after_sigterm_of_the_master_resumes_from_the_volume(tmp_path: Path) -> None:
    chaos = Chaos("master-0", signal.SIGTERM, log_pattern=r"^step=3$", recovery_pattern=r"^resumed$")
    result, _ = run(manifest(CHECKPOINTS_ON_SIGTERM, workers=1), tmp_path, chaos=[chaos])
    assert result.succeeded, result.conditions
    assert result.exit_codes["master-0"] == [143, 0]
    assert result.restarts["master-0"] == 1
    assert (tmp_path / "volumes" / "checkpoints" / "rehearsal" / "checkpoint-0").exists()
    assert result.master_log.read_text().count("resumed") == 1
    assert result.chaos[0].recovered_line == "resumed"


def test_backoff_limit_exhausted_fails_with_a_message(tmp_path: Path) -> None:
    dies = "import os, signal; print('dying', flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    result, _ = run(manifest(dies, workers=1, backoff=2), tmp_path)
    assert not result.succeeded
    final = result.final
    assert (final["type"], final["status"], final["reason"]) == ("Failed", "True", "BackoffLimitExceeded")
    assert "backoff limit" in final["message"] and "exit code 137" in final["message"]
    assert result.restarts["master-0"] == 2
    assert len(result.exit_codes["master-0"]) == 3


@pytest.mark.parametrize("policy, code, succeeded, restarts, reason", [
    ("ExitCode", 1, False, 0, "PyTorchJobFailed"),  # a bug fails fast
    ("ExitCode", 143, True, 1, "PyTorchJobSucceeded"),  # a signal is retried
    ("OnFailure", 1, True, 1, "PyTorchJobSucceeded"),
    ("Never", 143, False, 0, "PyTorchJobFailed"),
])
def test_restart_policy_decides_on_the_exit_code(tmp_path: Path, policy: str, code: int, succeeded: bool,
                                                 restarts: int, reason: str) -> None:
    result, _ = run(manifest(FIRST_ATTEMPT_EXITS.replace("CODE", str(code)), workers=1, policy=policy), tmp_path)
    assert result.succeeded is succeeded
    assert result.final["reason"] == reason
    assert result.restarts["master-0"] == restarts
    assert result.exit_codes["master-0"][0] == code
    if not succeeded:
        assert f"master-0 exit code {code}" in result.final["message"]


@pytest.mark.parametrize("deadline, timeout, reason", [(1, GUARD, "DeadlineExceeded"), (None, 1, "LocalTimeout")])
def test_deadlines_stop_every_replica(tmp_path: Path, deadline: int | None, timeout: float, reason: str) -> None:
    sleeper = "import time; print('sleeping', flush=True); time.sleep(60)"
    result, _ = run(manifest(sleeper, workers=1, deadline=deadline), tmp_path, timeout=timeout)
    assert not result.succeeded and result.final["reason"] == reason
    assert result.exit_codes == {"master-0": [143], "worker-0": [143]}  # SIGTERM, as pod deletion sends


def test_timed_chaos_fires_once(tmp_path: Path) -> None:
    chaos = Chaos("worker-0", signal.SIGTERM, after_seconds=0.0)
    result, _ = run(manifest(CHECKPOINTS_ON_SIGTERM, workers=1), tmp_path, chaos=[chaos])
    assert result.succeeded
    assert result.exit_codes["worker-0"][0] == 143 and result.restarts["worker-0"] == 1
    assert len(result.chaos) == 1


@pytest.mark.parametrize("policy, code, expected", [
    ("ExitCode", 137, True), ("ExitCode", 143, True), ("ExitCode", 1, False), ("ExitCode", 127, False),
    ("OnFailure", 1, True), ("Always", 2, True), ("Never", 137, False), ("OnFailure", 0, False),
])
def test_retryable_exit_codes(policy: str, code: int, expected: bool) -> None:
    assert retryable(policy, code) is expected


def test_signal_deaths_read_as_container_exit_codes() -> None:
    assert (exit_code(-9), exit_code(-15), exit_code(0), exit_code(1)) == (137, 143, 0, 1)


def _with_value_from(m: dict) -> None:
    m["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"] = [
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]


def _without_command(m: dict) -> None:
    del m["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]


def _without_master(m: dict) -> None:
    del m["spec"]["pytorchReplicaSpecs"]["Master"]


@pytest.mark.parametrize("edit, fragment", [
    (_with_value_from, "valueFrom"),
    (_without_command, "explicit command"),
    (_without_master, "Master"),
])
def test_bad_manifests_are_refused_before_anything_runs(tmp_path: Path, edit, fragment: str) -> None:
    m = manifest(PRINT_ENV)
    edit(m)
    with pytest.raises(ManifestError, match=fragment):
        run_local(m, tmp_path, log_stream=None)
    assert not (tmp_path / "logs" / "master-0.log").exists() or not (tmp_path / "logs" / "master-0.log").read_text()


def test_chaos_must_name_a_replica(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="worker-3"):
        run_local(manifest(PRINT_ENV), tmp_path, log_stream=None, chaos=[Chaos("worker-3")])


def test_cli_run_local_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(yaml.safe_dump(manifest(PRINT_ENV, workers=0)))
    bad.write_text(yaml.safe_dump(manifest("import sys; sys.exit(3)", workers=0)))
    assert cli.main(["pytorchjob", "run", str(good), "--local", "--workdir", str(tmp_path / "w1")]) == 0
    assert "Succeeded" in capsys.readouterr().out
    assert cli.main(["pytorchjob", "run", str(bad), "--local", "--workdir", str(tmp_path / "w2")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "PyTorchJobFailed" in err[0] and "exit code 3" in err[0]
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: PyTorchJob\nspec: [")
    assert cli.main(["pytorchjob", "run", str(broken), "--local"]) == 2
    assert "broken.yaml" in capsys.readouterr().err


def test_the_example_runs_as_a_two_replica_job_of_the_real_trainer(tmp_path: Path) -> None:
    """pipelines/jobs/examples/pytorchjob-tiny.yaml with fewer steps: gloo DDP across two processes, metrics on the
    master's stdout, adapter and checkpoints on the checkpoint volume."""
    if not (REPO / "trainer" / "train.py").exists():
        pytest.skip("the trainer has not landed")
    m = yaml.safe_load((REPO / "pipelines" / "jobs" / "examples" / "pytorchjob-tiny.yaml").read_text())
    short = ["--steps", "2", "--batch-size", "4", "--eval-every", "2", "--eval-size", "8", "--checkpoint-every", "1"]
    for rspec in m["spec"]["pytorchReplicaSpecs"].values():
        c = rspec["template"]["spec"]["containers"][0]
        c["args"] = short + c["args"][c["args"].index("--out"):]
    result = run_local(m, tmp_path, timeout=600, log_stream=io.StringIO(), cwd=REPO)
    assert result.succeeded, (result.conditions, result.master_log.read_text()[-2000:])
    assert "relevance_score=" in result.master_log.read_text()
    out = tmp_path / "volumes" / "checkpoints" / "arrcoc-tiny"
    assert (out / "metrics.json").exists() and (out / "adapter").is_dir()
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "step-00000002"


def test_local_backend_returns_the_one_result_type_or_raises_the_one_failure_type(tmp_path: Path) -> None:
    """The job backend interface (pipelines/jobs/backends.py) over this runner: what the train step, the CLI and
    the sweep see, the same types the cluster backend gives them."""
    from pipelines.jobs.backends import JobFailed, JobResult
    from pipelines.jobs.client import backend_for

    local = backend_for("local")
    good = manifest(PRINT_ENV, workers=1)
    result = local.run(good, tmp_path / "good", log_stream=None)
    assert isinstance(result, JobResult) and result.succeeded and result.failure == {}
    assert "hello from rank 0" in result.master_log.read_text()
    assert local.volume_dir(good, "checkpoints", tmp_path / "good") == tmp_path / "good" / "volumes" / "checkpoints"

    with pytest.raises(JobFailed) as info:
        local.run(manifest("import sys; sys.exit(3)", workers=0), tmp_path / "bad", log_stream=None)
    failed = info.value
    assert failed.exit_code == 1 and failed.reason == "PyTorchJobFailed" and "exit code 3" in failed.message
    assert not failed.result.succeeded and failed.result.conditions[-1]["type"] == "Failed"
    assert str(tmp_path / "bad" / "logs") in str(failed) and "\n" not in str(failed)
