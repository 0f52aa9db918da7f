"""Run a PyTorchJob on the cluster: create it, stream the master's log, wait for Succeeded or Failed, clean up.

KFP v2 has no ResourceOp, so the pipeline's train step calls `launch` from inside its pod. It goes through
kubeflow-training's TrainingClient (1.9.4) as its authors intend, with two things that client does not do:
- the log follower re-attaches when the operator recreates the master pod (ExitCode restarts make a new pod
  with the same name; TrainingClient.get_job_logs(follow=True) stops at the first pod's end and skips Pending pods);
- a Failed job raises PyTorchJobFailed carrying the Failed condition's reason and message (wait_for_job_conditions
  raises a RuntimeError holding the whole condition list as text).

Delete policy: always | on-success | never. A job that is still running when we stop waiting (timeout, or the
step itself being cancelled) is deleted under both always and on-success: a pipeline step that has given up
must not leave GPUs busy. on-success keeps a Failed job (its pods, with cleanPodPolicy Running) for debugging.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pipelines.pytorchjob import CONTAINER_NAME, from_manifest

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
DELETE_POLICIES = ("always", "on-success", "never")
TERMINAL = ("Succeeded", "Failed")

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """The job could not be launched or followed; printed as one line."""

    exit_code = 1


class PyTorchJobFailed(LaunchError):
    def __init__(self, namespace: str, name: str, reason: str, message: str, conditions: list[dict[str, Any]]):
        super().__init__(f"PyTorchJob {namespace}/{name} failed: {reason}: {message}")
        self.reason = reason
        self.message = message
        self.conditions = conditions


class PyTorchJobTimeout(LaunchError):
    pass


@dataclass
class LaunchResult:
    name: str
    namespace: str
    succeeded: bool
    conditions: list[dict[str, Any]]
    master_log: str = ""
    deleted: bool = False
    seconds: float = 0.0


def pod_namespace(path: Path = SERVICE_ACCOUNT_NAMESPACE) -> str | None:
    """The namespace of the pod we run in (a KFP step runs in the user's profile namespace)."""
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def training_client(**kwargs: Any):
    """TrainingClient for PyTorchJobs; kwargs as TrainingClient (client_configuration for a given API server)."""
    from kubeflow.training import TrainingClient
    from kubernetes.config import ConfigException

    try:
        return TrainingClient(job_kind="PyTorchJob", **kwargs)
    except ConfigException as exc:
        raise LaunchError(f"no cluster to talk to (no in-cluster service account, no kubeconfig): "
                          f"{_first_line(exc)}; use --local to rehearse on this machine") from None


def launch(
    job: Any,
    *,
    namespace: str | None = None,
    client: Any = None,
    timeout: float = 24 * 3600,
    poll_interval: float = 15.0,
    delete: str = "on-success",
    log_stream: TextIO | None = None,
) -> LaunchResult:
    """Create `job` (a KubeflowOrgV1PyTorchJob or its manifest dict) and follow it to the end.

    namespace: explicit, else the pod's own (service account file), else the manifest's.
    Raises PyTorchJobFailed (reason, message), PyTorchJobTimeout, or LaunchError.
    """
    if delete not in DELETE_POLICIES:
        raise LaunchError(f"delete={delete!r} is not one of {', '.join(DELETE_POLICIES)}")
    if timeout <= 0 or poll_interval <= 0:
        raise LaunchError("timeout and poll_interval must be > 0")
    model = from_manifest(job) if isinstance(job, Mapping) else job
    namespace = namespace or pod_namespace() or model.metadata.namespace
    if not namespace:
        raise LaunchError("no namespace: pass one, run in a pod, or set metadata.namespace")
    model.metadata.namespace = namespace
    name = model.metadata.name
    client = client or training_client(namespace=namespace)
    stream = log_stream if log_stream is not None else sys.stdout

    started = time.monotonic()
    try:
        client.create_job(job=model, namespace=namespace)
    except (RuntimeError, TimeoutError, ValueError) as exc:
        raise LaunchError(f"cannot create PyTorchJob {namespace}/{name}: {_first_line(exc)}") from exc
    follower = _MasterLogFollower(client, name, namespace, stream)
    follower.start()
    finished: Any = None
    try:
        finished = _wait(client, name, namespace, timeout, poll_interval)
    finally:
        follower.stop(drain=finished is not None)
        succeeded = finished is not None and _has(finished, "Succeeded")
        if delete == "always" or (delete == "on-success" and (succeeded or finished is None)):
            deleted = _delete(client, name, namespace)
        else:
            deleted = False
    conditions = _conditions(finished)
    result = LaunchResult(name=name, namespace=namespace, succeeded=succeeded, conditions=conditions,
                          master_log=follower.text, deleted=deleted, seconds=time.monotonic() - started)
    if not succeeded:
        failed = next((c for c in reversed(conditions) if c["type"] == "Failed" and c["status"] == "True"), {})
        raise PyTorchJobFailed(namespace, name, failed.get("reason") or "Failed",
                               failed.get("message") or "no message", conditions)
    return result


def _wait(client: Any, name: str, namespace: str, timeout: float, poll_interval: float) -> Any:
    # wait_for_job_conditions polls round(timeout / interval) times; keep at least one poll.
    interval = min(poll_interval, timeout)
    try:
        return client.wait_for_job_conditions(name=name, namespace=namespace, expected_conditions=set(TERMINAL),
                                              wait_timeout=timeout, polling_interval=interval)
    except TimeoutError:
        raise PyTorchJobTimeout(f"PyTorchJob {namespace}/{name} did not finish within {timeout:g} s") from None
    except RuntimeError as exc:
        raise LaunchError(f"cannot read PyTorchJob {namespace}/{name}: {_first_line(exc)}") from exc


def _delete(client: Any, name: str, namespace: str) -> bool:
    try:
        client.delete_job(name=name, namespace=namespace)
        return True
    except (RuntimeError, TimeoutError) as exc:
        # Cleanup must not hide the job's own outcome; the ttlSecondsAfterFinished the builder sets is the backstop.
        log.warning("could not delete PyTorchJob %s/%s: %s", namespace, name, _first_line(exc))
        return False


def _has(job: Any, kind: str) -> bool:
    return any(c["type"] == kind and c["status"] == "True" for c in _conditions(job))


def _conditions(job: Any) -> list[dict[str, Any]]:
    status = getattr(job, "status", None)
    return [{"type": c.type, "status": c.status, "reason": c.reason or "", "message": c.message or ""}
            for c in (getattr(status, "conditions", None) or [])]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass
class _MasterLogFollower:
    """Streams the master pod's `pytorch` container log, re-attaching to each new pod (by uid) until stopped."""

    client: Any
    name: str
    namespace: str
    out: TextIO
    poll: float = 0.5
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._seen: set[str] = set()
        self._thread = threading.Thread(target=self._run, name=f"logs-{self.name}", daemon=True)

    @property
    def text(self) -> str:
        return "".join(line + "\n" for line in self.lines)

    def start(self) -> None:
        self._thread.start()

    def stop(self, drain: bool) -> None:
        if drain:
            # The job is over: let the current stream reach the end of the log, then look once more.
            self._thread.join(timeout=10 * self.poll)
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        from kubernetes import watch

        while not self._stop.is_set():
            try:
                pods = self.client.get_job_pods(name=self.name, namespace=self.namespace, is_master=True)
            except (RuntimeError, TimeoutError):
                pods = []
            fresh = [p for p in pods if p.metadata.uid not in self._seen
                     and p.status is not None and p.status.phase not in (None, "Pending")]
            for pod in fresh:
                self._seen.add(pod.metadata.uid)
                try:
                    for line in watch.Watch().stream(self.client.core_api.read_namespaced_pod_log,
                                                     name=pod.metadata.name, namespace=self.namespace,
                                                     container=CONTAINER_NAME):
                        self.lines.append(line)
                        self.out.write(f"[{pod.metadata.name}] {line}\n")
                        self.out.flush()
                        if self._stop.is_set():
                            return
                except Exception as exc:  # a vanished pod or a dropped stream must not end the wait
                    log.warning("log stream of %s ended: %s", pod.metadata.name, _first_line(exc))
            if not fresh and self._stop.wait(self.poll):
                return
            if not fresh and self._done():
                return

    def _done(self) -> bool:
        try:
            job = self.client.get_job(name=self.name, namespace=self.namespace)
        except (RuntimeError, TimeoutError):
            return False
        return any(_has(job, kind) for kind in TERMINAL)
