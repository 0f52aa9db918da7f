"""The cluster launcher against a FAKE Kubernetes API server (kmock's KubernetesEmulator), because no cluster
exists here. The real TrainingClient and kubernetes client talk HTTP to it; each test plays the Training
Operator by writing the job's status conditions and the master pod into the fake server.

The launcher is synchronous (TrainingClient is), so it runs in a thread while the event loop serves kmock.
"""
from __future__ import annotations

import asyncio
import io
from pathlib import Path

import kmock
import pytest
from kmock import KubernetesError
from kubernetes import client as k8s

from pipelines.launcher import (LaunchError, PyTorchJobFailed, PyTorchJobTimeout, launch, pod_namespace,
                                training_client)
from pipelines.pytorchjob import build_pytorchjob, to_manifest
from pipelines.team_config import TeamConfig

NS = "team-a"
NAME = "tiny"
JOBS = kmock.resource("kubeflow.org/v1/pytorchjobs")
PODS = kmock.resource("v1/pods")


def job() -> dict:
    return to_manifest(build_pytorchjob(NAME, team=TeamConfig.local_default(), namespace="elsewhere", workers=1))


def client_for(server: kmock.RawHandler):
    config = k8s.Configuration()
    config.host = str(server.url).rstrip("/")
    return training_client(client_configuration=config, namespace=NS)


def condition(kind: str, reason: str = "", message: str = "") -> dict:
    return {"type": kind, "status": "True", "reason": reason or f"PyTorchJob{kind}", "message": message}


async def eventually(predicate, what: str, limit: float = 20.0) -> None:
    """Wait for the launcher thread to get somewhere; a guard against hanging, not a timing assertion."""
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


@pytest.mark.asyncio
async def test_create_running_succeeded_streams_master_log_and_deletes(kmock: kmock.RawHandler) -> None:
    master_log(kmock, b"step 1\nrelevance_score=0.61\n")
    out = io.StringIO()
    task = asyncio.create_task(asyncio.to_thread(
        launch, job(), namespace=NS, client=client_for(kmock), timeout=30, poll_interval=0.05, log_stream=out))
    operator = FakeOperator(kmock)
    await operator.created()
    operator.set_conditions(condition("Created"), condition("Running"))
    operator.master_pod(uid="pod-1")
    await eventually(lambda: "relevance_score" in out.getvalue(), "the master log was streamed")
    operator.set_conditions(condition("Created"), condition("Succeeded", message="done"))
    result = await task

    assert result.succeeded and result.deleted
    assert result.namespace == NS  # the namespace given wins over the manifest's
    assert "relevance_score=0.61" in result.master_log
    assert f"[{NAME}-master-0] relevance_score=0.61" in out.getvalue()
    created = kmock.objects[JOBS, NS, NAME, 0]
    assert created["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    assert created["metadata"]["namespace"] == NS
    assert deleted(kmock)


@pytest.mark.asyncio
async def test_failed_raises_with_reason_and_message(kmock: kmock.RawHandler) -> None:
    task = asyncio.create_task(asyncio.to_thread(
        launch, job(), namespace=NS, client=client_for(kmock), timeout=30, poll_interval=0.05,
        delete="on-success", log_stream=io.StringIO()))
    operator = FakeOperator(kmock)
    await operator.created()
    operator.set_conditions(condition("Created"), condition(
        "Failed", reason="BackoffLimitExceeded", message="PyTorchJob tiny has failed because it has reached the "
                                                         "specified backoff limit"))
    with pytest.raises(PyTorchJobFailed) as info:
        await task
    assert info.value.reason == "BackoffLimitExceeded"
    assert "reached the specified backoff limit" in info.value.message
    assert "BackoffLimitExceeded" in str(info.value) and "\n" not in str(info.value)
    assert not deleted(kmock)  # on-success keeps a failed job for debugging


@pytest.mark.asyncio
async def test_failed_job_is_deleted_under_always(kmock: kmock.RawHandler) -> None:
    task = asyncio.create_task(asyncio.to_thread(
        launch, job(), namespace=NS, client=client_for(kmock), timeout=30, poll_interval=0.05, delete="always",
        log_stream=io.StringIO()))
    operator = FakeOperator(kmock)
    await operator.created()
    operator.set_conditions(condition("Failed", message="1 Worker replica(s) failed"))
    with pytest.raises(PyTorchJobFailed, match="1 Worker replica"):
        await task
    assert deleted(kmock)


@pytest.mark.asyncio
@pytest.mark.parametrize("policy, expect_deleted", [("on-success", True), ("never", False)])
async def test_timeout_raises_and_cleans_up_per_policy(kmock: kmock.RawHandler, policy: str,
                                                       expect_deleted: bool) -> None:
    task = asyncio.create_task(asyncio.to_thread(
        launch, job(), namespace=NS, client=client_for(kmock), timeout=0.3, poll_interval=0.05, delete=policy,
        log_stream=io.StringIO()))
    operator = FakeOperator(kmock)
    await operator.created()
    operator.set_conditions(condition("Created"), condition("Running"))
    with pytest.raises(PyTorchJobTimeout, match=f"{NS}/{NAME}"):
        await task
    assert deleted(kmock) is expect_deleted


@pytest.mark.asyncio
async def test_log_follower_reattaches_to_a_recreated_master_pod(kmock: kmock.RawHandler) -> None:
    """ExitCode restarts recreate the master pod under the same name: its new log must be streamed too."""
    master_log(kmock, b"attempt line\n")
    out = io.StringIO()
    task = asyncio.create_task(asyncio.to_thread(
        launch, job(), namespace=NS, client=client_for(kmock), timeout=30, poll_interval=0.05, log_stream=out))
    operator = FakeOperator(kmock)
    await operator.created()
    operator.set_conditions(condition("Running"))
    operator.master_pod(uid="pod-1")
    await eventually(lambda: out.getvalue().count("attempt line") == 1, "the first pod's log was streamed")
    operator.master_pod(uid="pod-2")  # the recreated pod
    await eventually(lambda: out.getvalue().count("attempt line") == 2, "the recreated pod's log was streamed")
    operator.set_conditions(condition("Succeeded"))
    result = await task
    assert result.master_log.count("attempt line") == 2


@pytest.mark.asyncio
async def test_create_rejected_by_the_api_is_a_launch_error(kmock: kmock.RawHandler) -> None:
    kmock["post /apis/kubeflow.org/v1/namespaces/team-a/pytorchjobs"] << KubernetesError(
        status=403, reason="Forbidden", message="pytorchjobs is forbidden")  # e.g. missing kubeflow-edit rights
    with pytest.raises(LaunchError, match="cannot create PyTorchJob team-a/tiny"):
        await asyncio.to_thread(launch, job(), namespace=NS, client=client_for(kmock), timeout=5,
                                poll_interval=0.05, log_stream=io.StringIO())


def test_bad_delete_policy_is_rejected_before_anything_is_created() -> None:
    with pytest.raises(LaunchError, match="on-success"):
        launch(job(), namespace=NS, client=object(), delete="sometimes")


def test_pod_namespace_comes_from_the_service_account_file(tmp_path: Path) -> None:
    path = tmp_path / "namespace"
    assert pod_namespace(path) is None
    path.write_text("team-b\n")
    assert pod_namespace(path) == "team-b"
