"""The cluster job backend: create a PyTorchJob, stream the master's log, wait for Succeeded or Failed, clean up.

KFP v2 has no ResourceOp, so the pipeline's train step runs this from inside its pod. It talks to the API server
through kubeflow-training's TrainingClient (1.9.4) as its authors intend, and adds what that client leaves to
its caller (kubeflow-training 1.9.4, kubeflow/training/api/training_client.py):
- create_job/get_job/delete_job turn an ApiException into a RuntimeError raised `from` it, and any other error
  (a reset connection, an unreachable server) into a RuntimeError whose __context__ holds it; the status and
  reason are read back from that chain, so a rejected call is reported as "HTTP 403 Forbidden: <message>".
- wait_for_job_conditions gives up at the first failed read; a long wait here retries transient errors (HTTP
  408/429/5xx, connection errors, client timeouts) with exponential backoff, and never deletes a job because
  the API hiccupped.
- create_job fails with 409 AlreadyExists when a step is re-run under the same job name (a KFP retry keeps the
  run id). The job we would create carries a digest of its spec (annotation SPEC_ANNOTATION); an existing job
  with the same digest that is running or has succeeded is adopted and followed; one that failed, differs, or
  is being deleted is replaced: deleted, waited for until it is gone, created again.
- get_job_logs(follow=True) stops at the first pod's end and skips Pending pods; the log follower here
  re-attaches when the operator recreates the master pod (an ExitCode restart makes a new pod, same name).

What the Training Operator v1.9 does that this relies on (kubeflow/training-operator v1.9.2):
- pkg/controller.v1/pytorch/pytorchjob_controller.go (UpdateJobStatus): status.conditions Created, Running,
  Restarting, then Succeeded or Failed; a Failed job is final, the operator never runs it again, hence the
  replace above.
- pkg/controller.v1/common/pod.go and service.go: pods and services are created with a controller reference to
  the job, so deleting the job (propagationPolicy Foreground: the job object lingers until its pods are gone)
  stops the replicas and frees their GPUs.

Delete policy: always | on-success | never, for a job that ended. A job we stop waiting on while it still runs
(our timeout, an API error that is not transient) is deleted under always and on-success: a pipeline step that
has given up must not leave GPUs busy. A cancelled step (SIGTERM, as KFP/Argo sends when a run is terminated)
deletes its job under every policy: nobody is left to watch it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pipelines.jobs.backends import BackendError, ClusterOptions, JobBackend, JobFailed, JobResult, failed_condition
from pipelines.jobs.pytorchjob import from_manifest, to_manifest
from pipelines.jobs.rules import CONTAINER_NAME

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
DELETE_POLICIES = ("always", "on-success", "never")
TERMINAL = ("Succeeded", "Failed")
DEFAULT_TIMEOUT = 24 * 3600.0
SPEC_ANNOTATION = "arrcoc.dev/spec-sha256"
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
GONE_TIMEOUT = 600.0  # how long a replaced job may take to disappear (its pods' grace periods)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    """Pauses between retries of a transient API error: initial, x factor, at most `limit` seconds."""

    initial: float = 1.0
    factor: float = 2.0
    limit: float = 60.0

    def delays(self) -> Iterator[float]:
        delay = self.initial
        while True:
            yield delay
            delay = min(delay * self.factor, self.limit)


class _Stopped(Exception):
    """We stopped waiting on a job that has not ended; `kind` decides the clean-up."""

    def __init__(self, kind: str, reason: str, message: str, status: int | None = None):
        super().__init__(message)
        self.kind, self.reason, self.message = kind, reason, message  # kind: timeout | cancelled | api | gone
        self.status = status  # the HTTP status of an API refusal


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
        raise BackendError(f"no cluster to talk to (no in-cluster service account, no kubeconfig): "
                           f"{_first_line(exc)}; use --local to rehearse on this machine") from None


def spec_digest(manifest: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest.get("spec"), sort_keys=True).encode()).hexdigest()


def api_status(exc: BaseException) -> int | None:
    """The HTTP status of the ApiException behind a TrainingClient error, if there is one."""
    from kubernetes.client.exceptions import ApiException

    api = _find_in_chain(exc, ApiException)
    return api.status if api is not None else None


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the server was busy or unreachable for a moment, not a refusal."""
    import urllib3

    status = api_status(exc)
    if status is not None:
        return status in TRANSIENT_STATUSES
    return isinstance(exc, TimeoutError) or _find_in_chain(exc, (urllib3.exceptions.HTTPError, OSError)) is not None


def api_reason(exc: BaseException) -> tuple[str, str]:
    """(reason, one-line message) of a TrainingClient error, from the API's Status object when there is one:
    ("Forbidden", "HTTP 403 Forbidden: pytorchjobs.kubeflow.org is forbidden: ...")."""
    from kubernetes.client.exceptions import ApiException

    api = _find_in_chain(exc, ApiException)
    if api is None:
        cause = exc.__cause__ or exc.__context__ or exc
        return type(cause).__name__, _first_line(cause)
    try:
        body = json.loads(api.body or "{}")
    except ValueError:
        body = {"message": str(api.body)}
    body = body if isinstance(body, dict) else {}
    reason = str(body.get("reason") or api.reason or "Error").replace(" ", "")
    message = str(body.get("message") or "no message").replace("\n", " ")
    return reason, f"HTTP {api.status} {reason}: {message}"


class ClusterBackend(JobBackend):
    """Jobs run on the cluster this process can reach (in-cluster service account, else kubeconfig)."""

    where = "cluster"

    def __init__(self, options: ClusterOptions | None = None, *, client: Any = None, backoff: Backoff = Backoff()):
        self.options = options or ClusterOptions()
        if self.options.delete not in DELETE_POLICIES:
            raise BackendError(f"delete={self.options.delete!r} is not one of {', '.join(DELETE_POLICIES)}")
        if self.options.poll_interval <= 0:
            raise BackendError(f"poll_interval={self.options.poll_interval:g} must be > 0")
        self.client = client
        self.backoff = backoff
        self._cancel = threading.Event()

    def cancel(self) -> None:
        """Stop waiting and delete the job (what SIGTERM does to a run in the main thread)."""
        self._cancel.set()

    def volume_dir(self, job: Mapping[str, Any], volume: str, workdir: Path) -> Path:
        """The mount path, when this process mounts the same PVC there (KFP: kubernetes.mount_pvc on the step)."""
        master = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        source = next((v for v in master.get("volumes") or [] if v.get("name") == volume), {})
        container = next(c for c in master["containers"] if c.get("name") == CONTAINER_NAME)
        mount = next((m["mountPath"] for m in container.get("volumeMounts") or [] if m["name"] == volume), None)
        claim = (source.get("persistentVolumeClaim") or {}).get("claimName")
        mounts = dict(self.options.step_mounts)
        if claim is None or mount is None or mounts.get(claim) != mount:
            kind = f"PVC {claim!r}" if claim else f"of type {next((k for k in source if k != 'name'), 'none')}"
            raise BackendError(f"volume {volume!r} of the PyTorchJob is {kind} at {mount}, but this step mounts "
                               f"{', '.join(f'PVC {c!r} at {p}' for c, p in mounts.items()) or 'no PVC'}: the "
                               f"replicas would not see what it stages (team-config checkpointPVC names the PVC)")
        return Path(mount)

    def run(self, job: Mapping[str, Any] | Any, workdir: Path, *, timeout: float | None = None,
            log_stream: TextIO | None = None) -> JobResult:
        """namespace: the options', else the pod's own (service account file), else the manifest's."""
        timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        if timeout <= 0:
            raise BackendError(f"timeout={timeout:g} must be > 0")
        model = from_manifest(job) if isinstance(job, Mapping) else job
        namespace = self.options.namespace or pod_namespace() or model.metadata.namespace
        if not namespace:
            raise BackendError("no namespace: pass one, run in a pod, or set metadata.namespace")
        model.metadata.namespace = namespace
        name = model.metadata.name
        model.metadata.annotations = {**(model.metadata.annotations or {}),
                                      SPEC_ANNOTATION: spec_digest(to_manifest(model))}
        master_log = Path(workdir) / "logs" / "master-0.log"
        master_log.parent.mkdir(parents=True, exist_ok=True)
        master_log.write_text("")
        client = self.client or training_client(namespace=namespace)
        started = time.monotonic()
        deadline = started + timeout

        def result(conditions: list[dict[str, str]], deleted: bool = False) -> JobResult:
            return JobResult(name=name, namespace=namespace, conditions=conditions, master_log=master_log,
                             succeeded=_has(conditions, "Succeeded"), deleted=deleted,
                             seconds=time.monotonic() - started, logs_dir=master_log.parent)

        with _cancel_on_sigterm(self._cancel):
            try:
                self._create_or_adopt(client, model, deadline)
            except _Stopped as stop:
                raise JobFailed(result([failed_condition(stop.reason, stop.message)])) from None
            follower = _MasterLogFollower(client, name, namespace, master_log, log_stream)
            follower.start()
            finished: list[dict[str, str]] | None = None
            stopped: _Stopped | None = None
            try:
                finished = self._wait(client, name, namespace, deadline)
            except _Stopped as stop:
                stopped = stop
            finally:
                follower.stop(drain=finished is not None)
                deleted = self._clean_up(client, name, namespace, finished, stopped)
        if stopped is not None:
            raise JobFailed(result([failed_condition(stopped.reason, stopped.message)], deleted))
        outcome = result(finished or [], deleted)
        if not outcome.succeeded:
            raise JobFailed(outcome)
        return outcome

    # ------------------------------------------------------------ steps

    def _create_or_adopt(self, client: Any, model: Any, deadline: float) -> None:
        name, namespace = model.metadata.name, model.metadata.namespace
        where = f"PyTorchJob {namespace}/{name}"
        digest = model.metadata.annotations[SPEC_ANNOTATION]
        while True:
            try:
                self._call(client.create_job, deadline, f"create {where}", job=model, namespace=namespace)
                return
            except _Stopped as stop:
                if stop.status != 409:  # AlreadyExists
                    raise
            existing = self._read(client, name, namespace, deadline)
            if existing is None:
                continue  # deleted meanwhile: create again
            conditions = _conditions(existing)
            same = (existing.metadata.annotations or {}).get(SPEC_ANNOTATION) == digest
            if same and existing.metadata.deletion_timestamp is None and not _has(conditions, "Failed"):
                log.warning("%s already exists with the same spec and has not failed: following it", where)
                return
            why = ("is being deleted" if existing.metadata.deletion_timestamp is not None
                   else "failed" if same else "has a different spec")
            log.warning("%s already exists and %s: replacing it", where, why)
            self._delete(client, name, namespace)
            self._wait_gone(client, name, namespace, min(deadline, time.monotonic() + GONE_TIMEOUT))

    def _wait(self, client: Any, name: str, namespace: str, deadline: float) -> list[dict[str, str]]:
        while True:
            job = self._read(client, name, namespace, deadline)
            if job is None:
                raise _Stopped("gone", "NotFound", f"PyTorchJob {namespace}/{name} was deleted while we waited")
            conditions = _conditions(job)
            if any(_has(conditions, kind) for kind in TERMINAL):
                return conditions
            self._pause(self.options.poll_interval, deadline, f"PyTorchJob {namespace}/{name}")

    def _read(self, client: Any, name: str, namespace: str, deadline: float) -> Any | None:
        """The job, or None when it does not exist."""
        try:
            return self._call(client.get_job, deadline, f"read PyTorchJob {namespace}/{name}", name=name,
                              namespace=namespace)
        except _Stopped as stop:
            if stop.status == 404:
                return None
            raise

    def _call(self, method: Any, deadline: float, what: str, **kwargs: Any) -> Any:
        """method(**kwargs), retrying transient errors with backoff until the deadline."""
        delays = self.backoff.delays()
        while True:
            try:
                return method(**kwargs)
            except (RuntimeError, TimeoutError) as exc:
                reason, message = api_reason(exc)
                if not is_transient(exc):
                    raise _Stopped("api", reason, f"cannot {what}: {message}", api_status(exc)) from exc
                pause = next(delays)
                log.warning("cannot %s (%s), retrying in %g s", what, message, pause)
                self._pause(pause, deadline, what)

    def _pause(self, seconds: float, deadline: float, what: str) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Stopped("timeout", "Timeout", f"{what} did not finish within the step's timeout")
        if self._cancel.wait(min(seconds, remaining)):
            raise _Stopped("cancelled", "Cancelled", f"{what}: the step was cancelled")

    def _clean_up(self, client: Any, name: str, namespace: str, finished: list[dict[str, str]] | None,
                  stopped: _Stopped | None) -> bool:
        policy = self.options.delete
        if finished is not None:
            wanted = policy == "always" or (policy == "on-success" and _has(finished, "Succeeded"))
        elif stopped is not None and stopped.kind == "gone":
            wanted = False
        else:  # still running: cancelled, timed out, unreadable, or an exception of our own
            wanted = policy != "never" or (stopped is not None and stopped.kind == "cancelled")
        return wanted and self._delete(client, name, namespace)

    def _delete(self, client: Any, name: str, namespace: str) -> bool:
        from kubeflow.training import models

        deadline = time.monotonic() + 10 * self.backoff.limit  # clean-up retries even past the step's deadline
        cancel, self._cancel = self._cancel, threading.Event()  # a cancelled step still deletes its job
        try:
            self._call(client.delete_job, deadline, f"delete PyTorchJob {namespace}/{name}", name=name,
                       namespace=namespace, delete_options=models.V1DeleteOptions(propagation_policy="Foreground"))
            return True
        except _Stopped as stop:
            if stop.status == 404:
                return True
            # Cleanup must not hide the job's own outcome; the ttlSecondsAfterFinished the builder sets is the
            # backstop for a finished job.
            log.warning("could not delete PyTorchJob %s/%s: %s", namespace, name, stop.message)
            return False
        finally:
            self._cancel = cancel

    def _wait_gone(self, client: Any, name: str, namespace: str, deadline: float) -> None:
        while self._read(client, name, namespace, deadline) is not None:
            self._pause(self.options.poll_interval, deadline, f"deleting the old PyTorchJob {namespace}/{name}")


@contextmanager
def _cancel_on_sigterm(cancel: threading.Event) -> Iterator[None]:
    """In the main thread, SIGTERM (KFP terminating the run) sets `cancel` for the time of the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda signum, frame: cancel.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _find_in_chain(exc: BaseException | None, kinds: Any) -> Any:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kinds):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _has(conditions: list[dict[str, str]], kind: str) -> bool:
    return any(c["type"] == kind and str(c["status"]) == "True" for c in conditions)


def _conditions(job: Any) -> list[dict[str, str]]:
    status = getattr(job, "status", None)
    return [{"type": c.type, "status": c.status, "reason": c.reason or "", "message": c.message or ""}
            for c in (getattr(status, "conditions", None) or [])]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _MasterLogFollower:
    """Streams the master pod's `pytorch` container log to a file (and `out`), re-attaching to each new pod
    (by uid) until stopped."""

    def __init__(self, client: Any, name: str, namespace: str, path: Path, out: TextIO | None, poll: float = 0.5):
        self.client, self.name, self.namespace, self.path, self.out = client, name, namespace, path, out
        self.poll = poll
        self._stop = threading.Event()
        self._seen: set[str] = set()
        self._thread = threading.Thread(target=self._run, name=f"logs-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, drain: bool) -> None:
        if drain:
            # The job is over: let the current stream reach the end of the log, then look once more.
            self._thread.join(timeout=10 * self.poll)
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        with open(self.path, "a", encoding="utf-8") as file:
            while not self._stop.is_set():
                fresh = self._fresh_pods()
                for pod in fresh:
                    self._seen.add(pod.metadata.uid)
                    if self._stream(pod.metadata.name, file):
                        return
                if not fresh and (self._stop.wait(self.poll) or self._done()):
                    return

    def _fresh_pods(self) -> list[Any]:
        try:
            pods = self.client.get_job_pods(name=self.name, namespace=self.namespace, is_master=True)
        except (RuntimeError, TimeoutError):
            return []
        return [p for p in pods if p.metadata.uid not in self._seen
                and p.status is not None and p.status.phase not in (None, "Pending")]

    def _stream(self, pod: str, file: TextIO) -> bool:
        """Copy one pod's log; True when asked to stop meanwhile."""
        from kubernetes import watch

        try:
            for line in watch.Watch().stream(self.client.core_api.read_namespaced_pod_log, name=pod,
                                             namespace=self.namespace, container=CONTAINER_NAME):
                file.write(line + "\n")
                file.flush()
                if self.out is not None:
                    self.out.write(f"[{pod}] {line}\n")
                    self.out.flush()
                if self._stop.is_set():
                    return True
        except Exception as exc:  # a vanished pod or a dropped stream must not end the wait
            log.warning("log stream of %s ended: %s", pod, _first_line(exc))
        return False

    def _done(self) -> bool:
        try:
            job = self.client.get_job(name=self.name, namespace=self.namespace)
        except (RuntimeError, TimeoutError):
            return False
        return any(_has(_conditions(job), kind) for kind in TERMINAL)
