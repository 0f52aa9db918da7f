"""The cluster job backend against a FAKE Kubernetes API server (kmock's KubernetesEmulator), because no cluster
exists here. The real TrainingClient and kubernetes client talk HTTP to it; each test plays the Training
Operator by writing the job's status conditions and the master pod into the fake server, and plays a flaky API
server by answering some requests with errors before letting them through.

The backend is synchronous (TrainingClient is), so it runs in a thread while the event loop serves kmock.
"""
from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import kmock
import pytest
from kmock import KubernetesError
from kubernetes import client as k8s

from pipelines.jobs.backends import BackendError, ClusterOptions, JobFailed
from pipelines.jobs.cluster import (
    SPEC_ANNOTATION,
    Backoff,
    ClusterBackend,
    is_transient,
    pod_namespace,
    training_client,
)
from pipelines.jobs.pytorchjob import build_pytorchjob, to_manifest
from pipelines.jobs.team_config import TeamConfig

NS = "team-a"
NAME = "tiny"
JOBS = kmock.resource("kubeflow.org/v1/pytorchjobs")
PODS = kmock.resource("v1/pods")
JOB_URL = f"/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs"
FAST = Backoff(initial=0.01, limit=0.05)


def job(workers: int = 1) -> dict:
    return to_manifest(build_pytorchjob(NAME, team=TeamConfig.local_default(), namespace="elsewhere",
                                        workers=workers))


def client_for(server: kmock.RawHandler):
    config = k8s.Configuration()
    config.host = str(server.url).rstrip("/")
    return training_client(client_configuration=config, namespace=NS)


def backend(server: kmock.RawHandler, delete: str = "on-success") -> ClusterBackend:
    return ClusterBackend(ClusterOptions(namespace=NS, delete=delete, poll_interval=0.05),
                          client=client_for(server), backoff=FAST)


def run_in_thread(cluster: ClusterBackend, workdir: Path, manifest: dict | None = None, timeout: float = 30,
                  out: io.StringIO | None = None) -> asyncio.Task:
    return asyncio.create_task(asyncio.to_thread(cluster.run, manifest or job(), workdir, timeout=timeout,
                                                 log_stream=out if out is not None else io.StringIO()))


def condition(kind: str, reason: str = "", message: str = "") -> dict:
    return {"type": kind, "status": "True", "reason": reason or f"PyTorchJob{kind}", "message": message}


def fail_first(server: kmock.RawHandler, request: str, *errors: Exception) -> None:
    """Answer the first len(errors) matching requests with these errors, then let requests through."""
    pending = list(errors)
    server[request] << (lambda: pending.pop(0) if pending else None)


async def eventually(predicate, what: str, limit: float = 20.0) -> None:
    """Wait for the backend thread to get somewhere; a guard against hanging, not a timing assertion."""
    deadline = asyncio.get_running_loop().time() + limit
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.02)


class FakeOperator:
    """Moves the job through conditions once it has been created, and adds the master pod when Running."""

    def __init__(self, server: kmock.RawHandler):
        self.server = server

    async def created(self) -> None:
        await eventually(lambda: (JOBS, NS, NAME) in self.server.objects, "the job was created")

    def set_conditions(self, *conditions: dict) -> None:
        self.server.objects[JOBS, NS, NAME].patch({"status": {"conditions": list(conditions)}})

    def master_pod(self, uid: str, phase: str = "Running") -> None:
        self.server.objects[PODS, NS, f"{NAME}-master-0"] = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{NAME}-master-0", "namespace": NS, "uid": uid,
                         "labels": {"training.kubeflow.org/job-name": NAME,
                                    "training.kubeflow.org/job-role": "master"}},
            "status": {"phase": phase},
        }


def master_log(server: kmock.RawHandler, text: bytes) -> None:
    server[f"get /api/v1/namespaces/{NS}/pods/{NAME}-master-0/log"] << text


def deleted(server: kmock.RawHandler) -> bool:
    return server.objects[JOBS, NS, NAME].deleted


def requests(server: kmock.RawHandler, what: str) -> int:
    return len(list(server[what]))


@pytest.mark.asyncio
async def test_create_running_succeeded_streams_master_log_and_deletes(kmock: kmock.RawHandler,
                                                                       tmp_path: Path) -> None:
    master_log(kmock, b"step 1\nrelevance_score=0.61\n")
    out = io.StringIO()
    task = run_in_thread(backend(kmock), tmp_path, out=out)
    operator = FakeOperator(kmock)
    await operator.created()
    operator.set_conditions(condition("Created"), condition("Running"))
    operator.master_pod(uid="pod-1")
    await eventually(lambda: "relevance_score" in out.getvalue(), "the master log was streamed")
    operator.set_conditions(condition("Created"), condition("Succeeded", message="done"))
    result = await task

    assert result.succeeded and result.deleted
    assert result.namespace == NS  # the namespace given wins over the manifest's
    assert "relevance_score=0.61" in result.master_log.read_text()
    assert f"[{NAME}-master-0] relevance_score=0.61" in out.getvalue()
    created = kmock.objects[JOBS, NS, NAME, 0]
    assert created["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    assert created["metadata"]["namespace"] == NS
    assert created["metadata"]["annotations"][SPEC_ANNOTATION]
    assert deleted(kmock)


@pytest.mark.asyncio
async def test_failed_raises_with_reason_and_message(kmock: kmock.RawHandler, tmp_path: Path) -> None:
    task = run_in_thread(backend(kmock, delete="on-success"), tmp_path)
    operator = FakeOperator(kmock)
    await operator.created()
    operator.set_conditions(condition("Created"), condition(
        "Failed", reason="BackoffLimitExceeded", message="PyTorchJob tiny has failed because it has reached the "
                                                         "specified backoff limit"))
    with pytest.raises(JobFailed) as info:
        await task
    assert info.value.reason == "BackoffLimitExceeded" and info.value.exit_code == 1
    assert "reached the specified backoff limit" in info.value.message
    assert "BackoffLimitExceeded" in str(info.value) and "\n" not in str(info.value)
    assert not info.value.result.deleted and not deleted(kmock)  # on-success keeps a failed job for debugging


@pytest.mark.asyncio
async def test_failed_job_is_deleted_under_always(kmock: kmock.RawHandler, tmp_path: Path) -> None:
    task = run_in_thread(backend(kmock, delete="always"), tmp_path)
    operator = FakeOperator(kmock)
    await operator.created()
    operator.set_conditions(condition("Failed", message="1 Worker replica(s) failed"))
    with pytest.raises(JobFailed, match="1 Worker replica"):
        await task
    assert deleted(kmock)


@pytest.mark.asyncio
@pytest.mark.parametrize("policy, expect_deleted", [("on-success", True), ("never", False)])
async def test_timeout_fails_and_cleans_up_per_policy(kmock: kmock.RawHandler, tmp_path: Path, policy: str,
                                                      expect_deleted: bool) -> None:
    task = run_in_thread(backend(kmock, delete=policy), tmp_path, timeout=0.3)
    operator = FakeOperator(kmock)
    await operator.created()
    operator.set_conditions(condition("Created"), condition("Running"))
    with pytest.raises(JobFailed, match=f"{NS}/{NAME} failed: Timeout"):
        await task
    assert deleted(kmock) is expect_deleted


@pytest.mark.asyncio
@pytest.mark.parametrize("error", [
    KubernetesError(status=503, reason="ServiceUnavailable", message="etcd leader changed"),
    KubernetesError(status=429, reason="TooManyRequests", message="slow down"),
    KubernetesError(status=500, reason="InternalError", message="the server had an error"),
])
async def test_transient_api_errors_during_the_wait_are_retried_and_never_delete_the_job(
        kmock: kmock.RawHandler, tmp_path: Path, error: KubernetesError) -> None:
    task = run_in_thread(backend(kmock, delete="on-success"), tmp_path)
    operator = FakeOperator(kmock)
    await operator.created()
    operator.set_conditions(condition("Created"), condition("Running"))
    fail_first(kmock, f"get {JOB_URL}/{NAME}", *[error] * 4)
    await asyncio.sleep(0.5)  # the backend keeps reading through the errors
    assert not deleted(kmock) and not task.done()
    operator.set_conditions(condition("Created"), condition("Succeeded"))
    result = await task
    assert result.succeeded
    assert requests(kmock, "delete") == 1  # once, at the end, under on-success


def test_a_dropped_connection_counts_as_transient_a_refusal_does_not(tmp_path: Path) -> None:
    """A real TrainingClient error chain: nothing listens on the port (as during an API server restart)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = k8s.Configuration()
    config.host = f"http://127.0.0.1:{port}"
    config.retries = 0
    client = training_client(client_configuration=config, namespace=NS)
    with pytest.raises(RuntimeError) as info:
        client.get_job(name=NAME, namespace=NS)
    assert is_transient(info.value)
    assert not is_transient(RuntimeError("Failed to get PyTorchJob"))


@pytest.mark.asyncio
async def test_create_rejected_by_the_api_is_reported_with_its_reason(kmock: kmock.RawHandler,
                                                                      tmp_path: Path) -> None:
    kmock[f"post {JOB_URL}"] << KubernetesError(
        status=403, reason="Forbidden", message="pytorchjobs is forbidden")  # e.g. missing kubeflow-edit rights
    with pytest.raises(JobFailed) as info:
        await asyncio.to_thread(backend(kmock).run, job(), tmp_path, timeout=5, log_stream=io.StringIO())
    text = str(info.value)
    assert info.value.reason == "Forbidden" and "\n" not in text
    assert "cannot create PyTorchJob team-a/tiny: HTTP 403 Forbidden: pytorchjobs is forbidden" in text


@pytest.mark.asyncio
async def test_a_transient_create_error_is_retried(kmock: kmock.RawHandler, tmp_path: Path) -> None:
    fail_first(kmock, f"post {JOB_URL}", KubernetesError(status=503, reason="ServiceUnavailable", message="busy"))
    task = run_in_thread(backend(kmock), tmp_path)
    operator = FakeOperator(kmock)
    await operator.created()
    operator.set_conditions(condition("Succeeded"))
    assert (await task).succeeded
    assert requests(kmock, f"post {JOB_URL}") == 2


def _existing(server: kmock.RawHandler, manifest: dict, *conditions: dict, same_spec: bool = True) -> None:
    """A job left by an earlier attempt of the step, as the API server would hold it."""
    from pipelines.jobs.cluster import spec_digest

    old = to_manifest(build_pytorchjob(NAME, team=TeamConfig.local_default(), namespace=NS, workers=1))
    old["metadata"]["annotations"] = {SPEC_ANNOTATION: spec_digest(manifest) if same_spec else "other"}
    old["status"] = {"conditions": list(conditions)}
    server.objects[JOBS, NS, NAME] = old


@pytest.mark.asyncio
async def test_rerun_adopts_a_running_job_with_the_same_spec(kmock: kmock.RawHandler, tmp_path: Path) -> None:
    manifest = job()
    _existing(kmock, {**manifest, "spec": to_manifest(build_pytorchjob(
        NAME, team=TeamConfig.local_default(), namespace=NS, workers=1))["spec"]}, condition("Running"))
    task = run_in_thread(backend(kmock), tmp_path, manifest=manifest)
    await eventually(lambda: requests(kmock, f"get {JOB_URL}/{NAME}") >= 2, "the existing job was followed")
    assert not deleted(kmock)  # adopted, not replaced
    FakeOperator(kmock).set_conditions(condition("Running"), condition("Succeeded"))
    result = await task
    assert result.succeeded
    assert requests(kmock, "delete") == 1  # only the on-success clean-up at the end


@pytest.mark.asyncio
@pytest.mark.parametrize("conditions, same_spec", [
    ([condition("Failed", reason="BackoffLimitExceeded")], True),
    ([condition("Running")], False),
])
async def test_rerun_replaces_a_failed_or_different_job(kmock: kmock.RawHandler, tmp_path: Path,
                                                        conditions: list, same_spec: bool) -> None:
    manifest = job()
    _existing(kmock, {**manifest, "spec": to_manifest(build_pytorchjob(
        NAME, team=TeamConfig.local_default(), namespace=NS, workers=1))["spec"]}, *conditions,
        same_spec=same_spec)
    task = run_in_thread(backend(kmock), tmp_path, manifest=manifest)
    await eventually(lambda: requests(kmock, f"post {JOB_URL}") >= 2, "the job was created again")
    fresh = kmock.objects[JOBS, NS, NAME]
    assert not fresh.deleted and not (fresh.get("status") or {}).get("conditions")
    FakeOperator(kmock).set_conditions(condition("Succeeded"))
    assert (await task).succeeded
    first_delete = next(iter(kmock["delete"]))
    assert first_delete.data["propagationPolicy"] == "Foreground"


@pytest.mark.asyncio
async def test_cancel_deletes_the_running_job_even_under_never(kmock: kmock.RawHandler, tmp_path: Path) -> None:
    cluster = backend(kmock, delete="never")
    task = run_in_thread(cluster, tmp_path)
    operator = FakeOperator(kmock)
    await operator.created()
    operator.set_conditions(condition("Running"))
    cluster.cancel()
    with pytest.raises(JobFailed, match="Cancelled") as info:
        await task
    assert deleted(kmock) and info.value.result.deleted


@pytest.mark.asyncio
async def test_sigterm_to_the_step_process_deletes_the_job(kmock: kmock.RawHandler, tmp_path: Path) -> None:
    """What KFP does when a run is terminated: SIGTERM to the step's process, which runs the backend in its
    main thread (a real process here, talking to the fake API over HTTP)."""
    (tmp_path / "job.json").write_text(__import__("json").dumps(job()))
    script = textwrap.dedent(f"""
        import json, sys
        from kubernetes import client as k8s
        from pipelines.jobs.backends import ClusterOptions, JobFailed
        from pipelines.jobs.cluster import ClusterBackend, training_client
        config = k8s.Configuration()
        config.host = {str(kmock.url).rstrip('/')!r}
        client = training_client(client_configuration=config, namespace={NS!r})
        backend = ClusterBackend(ClusterOptions(namespace={NS!r}, delete="never", poll_interval=0.05), client=client)
        try:
            backend.run(json.load(open({str(tmp_path / 'job.json')!r})), {str(tmp_path)!r}, timeout=60)
        except JobFailed as exc:
            print(exc)
            sys.exit(exc.exit_code)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    try:
        operator = FakeOperator(kmock)
        await operator.created()
        operator.set_conditions(condition("Running"))
        proc.send_signal(signal.SIGTERM)
        await eventually(lambda: proc.poll() is not None, "the step process ended")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and "Cancelled" in proc.stdout.read()
    assert deleted(kmock)


@pytest.mark.asyncio
async def test_log_follower_reattaches_to_a_recreated_master_pod(kmock: kmock.RawHandler, tmp_path: Path) -> None:
    """ExitCode restarts recreate the master pod under the same name: its new log must be streamed too."""
    master_log(kmock, b"attempt line\n")
    out = io.StringIO()
    task = run_in_thread(backend(kmock), tmp_path, out=out)
    operator = FakeOperator(kmock)
    await operator.created()
    operator.set_conditions(condition("Running"))
    operator.master_pod(uid="pod-1")
    await eventually(lambda: out.getvalue().count("attempt line") == 1, "the first pod's log was streamed")
    operator.master_pod(uid="pod-2")  # the recreated pod
    await eventually(lambda: out.getvalue().count("attempt line") == 2, "the recreated pod's log was streamed")
    operator.set_conditions(condition("Succeeded"))
    result = await task
    assert result.master_log.read_text().count("attempt line") == 2


def test_bad_options_are_rejected_before_anything_is_created() -> None:
    with pytest.raises(BackendError, match="on-success"):
        ClusterBackend(ClusterOptions(delete="sometimes"), client=object())


def test_the_step_must_mount_the_pvc_the_replicas_use(tmp_path: Path) -> None:
    team = TeamConfig.local_default()
    manifest = to_manifest(build_pytorchjob(NAME, team=team, namespace=NS))
    expected = "volume 'checkpoints' of the PyTorchJob is of type emptyDir at /checkpoints, but this step mounts PVC"
    with pytest.raises(BackendError, match=expected):
        ClusterBackend(ClusterOptions(step_mounts={"checkpoints": "/checkpoints"})).volume_dir(
            manifest, "checkpoints", tmp_path)


def test_pod_namespace_comes_from_the_service_account_file(tmp_path: Path) -> None:
    path = tmp_path / "namespace"
    assert pod_namespace(path) is None
    path.write_text("team-b\n")
    assert pod_namespace(path) == "team-b"
