"""A local rehearsal of a PyTorchJob: every replica of the manifest runs on this machine, as a process (the default)
or as a container of the manifest's own image (`containers=True`: podman, pipelines/image/podman.py).

This is not an operator. It reads the same manifest a cluster gets and reproduces what the Training Operator
does that matters to the trainer, so a local success means the manifest and the trainer agree:

- Env: each replica gets the variables the operator injects: PYTHONUNBUFFERED=1, MASTER_ADDR=PET_MASTER_ADDR=
  127.0.0.1 (in place of the `<job>-master-0` service), MASTER_PORT=PET_MASTER_PORT=a free port, WORLD_SIZE =
  replicas x int(nprocPerNode) (a non-integer counts 1), RANK=PET_NODE_RANK=node index (Master 0, Worker i ->
  i+1), PET_NPROC_PER_NODE, PET_NNODES; on top of this machine's environment (minus any inherited torchrun
  variables) and the `pytorch` container's env. The image is ignored.
- Network (process mode): each replica is a pod with its own address, a loopback one (127.a.b.c, all replicas of a
  job in one block whose declared container ports are free), in POD_IP, a variable the operator does not set:
  servers in the replica (the trainer's metrics exporter) listen there, so two replicas can serve the same declared
  port, as two pods can. The addresses, ports and labels (the template's plus the operator's training.kubeflow.org/*
  labels: kubeflow/trainer v1.9.2 pkg/controller.v1/common/pod.go createNewPod) are printed at the start and kept in
  <workdir>/pods.json, Pod-shaped, as a Prometheus service discovery would see them
  (pipelines/monitoring/scrape.py).
- Command: the `pytorch` container's command + args; `python`/`python3` become sys.executable (this venv) and
  `torchrun` becomes `sys.executable -m torch.distributed.run`.
- Volumes: each volumeMount of that container maps to the directory <workdir>/volumes/<volume name>
  (plus its subPath). Only path prefixes are rewritten: an arg or env value equal to a mountPath, or starting
  with mountPath + "/", or of the form --flag=<such a path>, gets the mountPath replaced by that directory.
  The directories are shared by all replicas and kept across restarts and runs (as a PVC or bucket would be;
  emptyDir's per-pod lifetime is not rehearsed). Mounts at /tmp and /dev/shm are not rewritten: a process has
  this machine's own.
- Containers (`containers=True`): each replica is `podman run` of the manifest's image with the pod's settings
  (user, groups, read-only root, capabilities, limits, env, volumes: pipelines/image/podman.py run_args) on a
  podman network of the job's own, where it is reachable as `<job>-master-0` / `<job>-worker-<i>`, the
  names the operator's headless services give; MASTER_ADDR is that name and MASTER_PORT the container's
  pytorchjob-port, as the operator sets them. The checkpoint volume is <workdir>/volumes/checkpoints as above
  (it stands in for the team's PVC or bucket); any other emptyDir is a fresh folder per replica start (a pod's),
  a Memory emptyDir a tmpfs. Signals go to the container (`podman kill`). A container has a network of its own and
  no POD_IP, so its servers listen on all its interfaces, as in a pod.
- Logs: each line goes to log_stream as "[master-0] ..." / "[worker-0] ..." and to <workdir>/logs/<replica>.log
  (one file per replica; restarts append).
- Failures, as the operator's restartPolicy: OnFailure (and Always) restart on any non-zero exit; ExitCode
  restarts on 128-255 (signals: 137 SIGKILL, 143 SIGTERM) and fails at once on 1-127; Never fails on any
  non-zero exit. The Master exiting 0 is success (the operator's default success policy).

One choice differs from the operator, on purpose: a restart restarts the whole group. The operator recreates
only the failed pod, but a static torch.distributed rendezvous cannot take a newcomer into a running group, so
the survivors' collectives break and they exit too (on a cluster: their pods fail or restart in turn). Here,
when a replica's exit is retryable, the others get SIGTERM (SIGKILL after the pod's
terminationGracePeriodSeconds, default 30), and all replicas start again on a fresh port. That is one restart
against runPolicy.backoffLimit (unset: unlimited, as the operator); when restarts would exceed it the job
Fails with reason BackoffLimitExceeded. Exits seen in the same poll are judged together and a retryable one
wins: a survivor's "connection reset" exit 1 only ever follows the death that caused it.
runPolicy.activeDeadlineSeconds (and the caller's timeout) stop everything with a Failed condition.

LocalBackend is this runner behind the job backend interface (pipelines/jobs/backends.py): what the train step,
`arrcoc pytorchjob run --local` and the local sweep use.

For the preemption drill, `chaos` kills a chosen replica with a chosen signal when its log shows a
pattern or after some seconds, and the result records when and how long the job took to recover.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import random
import re
import shutil
import signal as signals
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pipelines.jobs.backends import JobBackend, JobFailed, JobResult
from pipelines.jobs.pytorchjob import (
    CHECKPOINT_VOLUME,
    DEFAULT_PORT,
    PORT_NAME,
    ManifestError,
    check_manifest,
    pytorch_container,
    to_manifest,
)
from trainer.files import write_json_atomic

DEFAULT_GRACE_SECONDS = 30
POD_IP_ENV = "POD_IP"
PODS_FILE = "pods.json"
OPERATOR_NAME = "pytorchjob-controller"  # kubeflow/trainer v1.9.2 pkg/controller.v1/pytorch/pytorchjob_controller.go
# A process has this machine's own /tmp and /dev/shm: mounts there are not rewritten in process mode.
_MACHINE_PATHS = ("/tmp", "/dev/shm")
# torchrun / torchelastic variables of an outer launcher must not leak into a replica's world.
_INHERITED_DROP = re.compile(r"(PET_|TORCHELASTIC_).*|RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|GROUP_RANK|"
                             r"GROUP_WORLD_SIZE|ROLE_RANK|ROLE_WORLD_SIZE|ROLE_NAME|MASTER_ADDR|MASTER_PORT")


@dataclass(frozen=True)
class Chaos:
    """Kill `replica` ("master-0", "worker-<i>") with `signal`, once: at the first line of its output matching
    `log_pattern`, or `after_seconds` after the job started (whichever comes first when both are set).
    Recovery is the first line afterwards, from a restarted replica, matching `recovery_pattern`
    (default: the restarted master's first line)."""

    replica: str
    signal: int = signals.SIGKILL
    log_pattern: str | None = None
    after_seconds: float | None = None
    recovery_pattern: str | None = None


@dataclass
class ChaosEvent:
    replica: str
    signal: int
    fired_at: float  # seconds since the job started
    trigger: str  # the matched log line, or "after N s"
    attempt: int = 1  # the group attempt it killed; recovery is seen in a later one
    recovered_at: float | None = None
    recovered_line: str | None = None

    @property
    def recovery_seconds(self) -> float | None:
        return None if self.recovered_at is None else self.recovered_at - self.fired_at


@dataclass
class LocalJobResult:
    name: str
    succeeded: bool
    conditions: list[dict[str, str]]  # like status.conditions: type, status, reason, message, lastTransitionTime
    restarts: dict[str, int]  # replica -> times it was started again
    exit_codes: dict[str, list[int]]  # replica -> exit code of each attempt (signals as 128 + n)
    master_log: Path
    logs: dict[str, Path]
    chaos: list[ChaosEvent] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final(self) -> dict[str, str]:
        return self.conditions[-1] if self.conditions else {}


def run_local(manifest: dict, workdir: Path, timeout: float | None = None, log_stream: TextIO | None = sys.stdout,
              *, chaos: Sequence[Chaos] = (), cwd: Path | None = None, poll_interval: float = 0.05,
              containers: bool = False) -> LocalJobResult:
    """Run the PyTorchJob `manifest` locally until it Succeeds or Fails (see the module docstring); with
    `containers`, each replica as a podman container of the manifest's image.

    Bad manifests raise ManifestError (one line naming the field); a failing job returns succeeded=False
    with a Failed condition carrying reason and message.
    """
    launcher = _ContainerLauncher() if containers else _ProcessLauncher(cwd)
    return _LocalJob(manifest, Path(workdir), timeout, log_stream, list(chaos), launcher, poll_interval).run()


class LocalBackend(JobBackend):
    """Jobs run here, by run_local; volumes are folders under <workdir>/volumes."""

    where = "local"

    def __init__(self, chaos: Sequence[Chaos] = (), cwd: Path | None = None, containers: bool = False):
        self.chaos = tuple(chaos)
        self.cwd = cwd
        self.containers = containers

    def run(self, job: Mapping[str, Any] | Any, workdir: Path, *, timeout: float | None = None,
            log_stream: TextIO | None = None) -> JobResult:
        manifest = job if isinstance(job, Mapping) else to_manifest(job)
        local = run_local(manifest, Path(workdir), timeout=timeout, log_stream=log_stream, chaos=self.chaos,
                          cwd=self.cwd, containers=self.containers)
        namespace = (manifest.get("metadata") or {}).get("namespace") or "default"
        result = JobResult(name=local.name, namespace=namespace, succeeded=local.succeeded,
                           conditions=local.conditions, master_log=local.master_log, seconds=local.seconds,
                           logs_dir=Path(workdir) / "logs")
        if not result.succeeded:
            raise JobFailed(result, hint=f"replica logs: {result.logs_dir}")
        return result

    def volume_dir(self, job: Mapping[str, Any], volume: str, workdir: Path) -> Path:
        return Path(workdir) / "volumes" / volume


def exit_code(returncode: int) -> int:
    """Popen's -N for "killed by signal N" as the 128 + N a container reports."""
    return 128 - returncode if returncode < 0 else returncode


def retryable(policy: str, code: int) -> bool:
    if code == 0 or policy == "Never":
        return False
    if policy == "ExitCode":
        return 128 <= code <= 255
    return True  # OnFailure, Always


# ------------------------------------------------------------------------------------------------ internals


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def operator_pod_labels(job: str, rtype: str, index: int) -> dict[str, str]:
    """The labels the Training Operator v1.9.2 adds to a replica's pod (kubeflow/trainer pkg/controller.v1/common
    job_controller.go GenLabels and pod.go createNewPod)."""
    labels = {"training.kubeflow.org/operator-name": OPERATOR_NAME, "training.kubeflow.org/job-name": job,
              "training.kubeflow.org/replica-type": rtype.lower(), "training.kubeflow.org/replica-index": str(index)}
    if rtype == "Master":
        labels["training.kubeflow.org/job-role"] = "master"
    return labels


def _pod_addresses(count: int, ports: Sequence[int], tries: int = 50) -> list[str]:
    """`count` consecutive loopback addresses (never 127.0.0.1) on which every one of `ports` is free."""
    for _ in range(tries):
        first = ipaddress.IPv4Address("127.0.0.0") + random.randrange(1 << 16, (1 << 24) - count - 1)
        addresses = [str(first + i) for i in range(count)]
        if all(_bindable(a, p) for a in addresses for p in ports):
            return addresses
    raise RuntimeError(f"no block of {count} loopback addresses with ports {list(ports)} free after {tries} tries")


def _bindable(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((address, port))
        except OSError:
            return False
        return True


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Replica:
    name: str  # master-0, worker-0, ...
    rtype: str  # Master | Worker
    node_rank: int
    policy: str
    pod_spec: dict  # the replica's pod template spec, as the manifest has it
    container: dict  # its `pytorch` container
    grace: float
    log_path: Path
    proc: subprocess.Popen | None = None  # the replica's process, or the `podman run` client of its container
    reader: threading.Thread | None = None
    pod: dict = field(default_factory=dict)  # the Pod this replica stands for: name, labels, ports, IP, phase
    attempt: int = 0
    done: bool = False  # exited and not to be waited on until the next group start

    @property
    def ip(self) -> str:
        return self.pod["status"]["podIP"]


class _LocalJob:
    def __init__(self, manifest: dict, workdir: Path, timeout: float | None, log_stream: TextIO | None,
                 chaos: list[Chaos], launcher: _ProcessLauncher | _ContainerLauncher, poll_interval: float):
        name = str((manifest.get("metadata") or {}).get("name", "")) if isinstance(manifest, Mapping) else ""
        check_manifest(manifest, source=f"PyTorchJob {name or '?'}")
        spec = manifest["spec"]  # check_manifest made sure of a Master: its address is the rendezvous
        if spec.get("elasticPolicy"):
            raise ManifestError(f"PyTorchJob {name}: spec.elasticPolicy is not rehearsed locally")
        if timeout is not None and timeout <= 0:
            raise ManifestError(f"timeout={timeout} must be > 0")
        self.name = name
        self.namespace = (manifest.get("metadata") or {}).get("namespace") or "default"
        self.workdir = workdir
        self.timeout = timeout
        self.out = log_stream
        self.launcher = launcher
        self.poll = poll_interval
        run_policy = spec.get("runPolicy") or {}
        self.backoff_limit: int | None = run_policy.get("backoffLimit")
        self.active_deadline: int | None = run_policy.get("activeDeadlineSeconds")
        self.nproc = str(spec.get("nprocPerNode", "auto"))
        self.lock = threading.Lock()
        self.conditions: list[dict[str, str]] = []
        self.chaos = [(c, re.compile(c.log_pattern) if c.log_pattern else None) for c in chaos]
        self.chaos_events: list[tuple[Chaos, ChaosEvent]] = []
        self.started = 0.0
        self.replicas = self._replicas(spec)
        known = {r.name for r in self.replicas}
        for c in chaos:
            if c.replica not in known:
                raise ManifestError(f"chaos replica {c.replica!r} is not one of {', '.join(sorted(known))}")
        self.restarts = {r.name: 0 for r in self.replicas}
        self.exit_codes: dict[str, list[int]] = {r.name: [] for r in self.replicas}
        self.master_addr, self.port = "", 0
        self.group_restarts = 0  # what runPolicy.backoffLimit counts
        launcher.prepare(self)

    # ------------------------------------------------------------ set-up

    def _replicas(self, spec: Mapping[str, Any]) -> list[_Replica]:
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out: list[_Replica] = []
        for rtype in ("Master", "Worker"):
            rspec = spec["pytorchReplicaSpecs"].get(rtype)
            if not rspec:
                continue
            container = pytorch_container(rspec)
            where = f"PyTorchJob {self.name}: spec.pytorchReplicaSpecs.{rtype}"
            if not container.get("command"):
                raise ManifestError(f"{where}: the pytorch container needs an explicit command (the image's "
                                    f"entrypoint is unknown locally)")
            for e in container.get("env") or []:
                if "valueFrom" in e:
                    raise ManifestError(f"{where}: env {e.get('name')!r} uses valueFrom, which is not rehearsed "
                                        f"locally; give a value")
            pod_spec = rspec["template"]["spec"]
            grace = float(pod_spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS))
            policy = rspec.get("restartPolicy") or "OnFailure"  # the operator's default
            for i in range(int(rspec.get("replicas", 1))):
                name = f"{rtype.lower()}-{i}"
                log_path = logs / f"{name}.log"
                log_path.write_text("")  # a new run starts new logs; the volumes persist
                pod = self._pod(rspec, rtype, i, container)
                out.append(_Replica(name, rtype, 0 if rtype == "Master" else i + 1, policy, pod_spec, container,
                                    grace, log_path, pod=pod))
        ports = sorted({p["containerPort"] for r in out for p in r.pod["spec"]["containers"][0]["ports"]})
        for r, ip in zip(out, _pod_addresses(len(out), ports)):
            r.pod["status"]["podIP"] = ip
        return out

    def _pod(self, rspec: Mapping[str, Any], rtype: str, index: int, container: Mapping[str, Any]) -> dict:
        """The Pod the operator would create for this replica, as far as discovery and scraping see it."""
        template_meta = (rspec.get("template") or {}).get("metadata") or {}
        labels = {**(template_meta.get("labels") or {}), **operator_pod_labels(self.name, rtype, index)}
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"{self.name}-{rtype.lower()}-{index}", "namespace": self.namespace,
                             "labels": labels, "annotations": dict(template_meta.get("annotations") or {})},
                "spec": {"containers": [{"name": container["name"], "ports": list(container.get("ports") or [])}]},
                "status": {"phase": "Pending", "podIP": ""}}

    def _write_pods(self) -> None:
        write_json_atomic(self.workdir / PODS_FILE, [r.pod for r in self.replicas])

    def _injected_env(self, replica: _Replica) -> dict[str, str]:
        per_node = int(self.nproc) if self.nproc.isdigit() else 1
        return {
            "PYTHONUNBUFFERED": "1",
            "MASTER_ADDR": self.master_addr, "PET_MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.port), "PET_MASTER_PORT": str(self.port),
            "WORLD_SIZE": str(len(self.replicas) * per_node),
            "RANK": str(replica.node_rank), "PET_NODE_RANK": str(replica.node_rank),
            "PET_NPROC_PER_NODE": self.nproc,
            "PET_NNODES": str(len(self.replicas)),
            POD_IP_ENV: replica.ip,
        }

    # ------------------------------------------------------------ conditions

    def _condition(self, kind: str, reason: str, message: str) -> None:
        # As the operator: Running and Restarting replace each other; a terminal condition turns Running off.
        if kind in ("Running", "Restarting"):
            self.conditions = [c for c in self.conditions if c["type"] not in ("Running", "Restarting")]
        if kind in ("Succeeded", "Failed"):
            for c in self.conditions:
                if c["type"] == "Running":
                    c["status"] = "False"
        self.conditions = [c for c in self.conditions if c["type"] != kind]
        self.conditions.append({"type": kind, "status": "True", "reason": reason, "message": message,
                                "lastTransitionTime": _now_iso()})
        self._say(f"{kind}: {message}")

    def _say(self, text: str) -> None:
        if self.out is not None:
            with self.lock:
                self.out.write(f"[local-runner] {text}\n")
                self.out.flush()

    # ------------------------------------------------------------ processes

    def _start_all(self) -> None:
        self.master_addr, self.port = self.launcher.rendezvous(self)
        for r in self.replicas:
            r.attempt += 1
            r.done = False
            r.proc = self.launcher.start(self, r, self._injected_env(r))
            r.reader = threading.Thread(target=self._read, args=(r, r.proc, r.attempt), daemon=True,
                                        name=f"{self.name}-{r.name}-{r.attempt}")
            r.reader.start()
            r.pod["status"]["phase"] = "Running"
            r.pod["metadata"]["annotations"]["local-runner/pid"] = str(r.proc.pid)
            if r.attempt == 1 and r.ip:  # process mode: each "pod" has a loopback address of its own
                ports = [f"{p.get('name', p['containerPort'])} " + (f"http://{r.ip}:{p['containerPort']}/metrics"
                         if p.get("name") == "metrics" else f"{r.ip}:{p['containerPort']}")
                         for p in r.pod["spec"]["containers"][0]["ports"] if p.get("name") != PORT_NAME]
                self._say(f"pod {r.pod['metadata']['name']} ({r.name}) at {r.ip}" +
                          (f": {', '.join(ports)}" if ports else ""))
        self._write_pods()

    def _read(self, r: _Replica, proc: subprocess.Popen, attempt: int) -> None:
        assert proc.stdout is not None
        with open(r.log_path, "a", encoding="utf-8") as log:
            for raw in iter(proc.stdout.readline, b""):
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                log.write(line + "\n")
                log.flush()
                with self.lock:
                    if self.out is not None:
                        self.out.write(f"[{r.name}] {line}\n")
                        self.out.flush()
                    self._on_line(r, proc, attempt, line)
        proc.stdout.close()

    def _on_line(self, r: _Replica, proc: subprocess.Popen, attempt: int, line: str) -> None:
        """Called under self.lock: fire log-triggered chaos, note recoveries."""
        now = time.monotonic() - self.started
        for chaos, event in self.chaos_events:
            if event.recovered_at is not None or attempt <= event.attempt:
                continue
            pattern = chaos.recovery_pattern
            if (pattern and re.search(pattern, line)) or (not pattern and r.rtype == "Master"):
                event.recovered_at, event.recovered_line = now, line
        for chaos, pattern in list(self.chaos):
            if chaos.replica == r.name and pattern is not None and pattern.search(line):
                self._fire(chaos, r, proc, line)

    def _fire(self, chaos: Chaos, r: _Replica, proc: subprocess.Popen, trigger: str) -> None:
        """Called under self.lock."""
        self.chaos = [(c, p) for c, p in self.chaos if c is not chaos]
        if proc.poll() is not None:
            return
        event = ChaosEvent(r.name, int(chaos.signal), time.monotonic() - self.started, trigger, r.attempt)
        self.chaos_events.append((chaos, event))
        self.launcher.signal(r, proc, chaos.signal)  # the whole "pod": torchrun and its children alike
        if self.out is not None:
            self.out.write(f"[local-runner] chaos: sent {signals.Signals(chaos.signal).name} to {r.name} ({trigger})\n")

    def _timed_chaos(self) -> None:
        elapsed = time.monotonic() - self.started
        with self.lock:
            for chaos, _ in list(self.chaos):
                if chaos.after_seconds is not None and elapsed >= chaos.after_seconds:
                    r = next(x for x in self.replicas if x.name == chaos.replica)
                    if r.proc is not None and not r.done:
                        self._fire(chaos, r, r.proc, f"after {chaos.after_seconds:g} s")

    def _reap(self, r: _Replica) -> int:
        assert r.proc is not None
        code = exit_code(r.proc.wait())
        if r.reader is not None:
            r.reader.join(timeout=5)
        r.done = True
        self.exit_codes[r.name].append(code)
        r.pod["status"]["phase"] = "Succeeded" if code == 0 else "Failed"
        self._write_pods()
        return code

    def _stop_all(self, grace: float | None = None) -> None:
        """SIGTERM every live replica, then SIGKILL whatever outlives the grace period (as pod deletion does)."""
        live = [r for r in self.replicas if r.proc is not None and not r.done]
        for r in live:
            self.launcher.signal(r, r.proc, signals.SIGTERM)
        limit = time.monotonic() + (max(r.grace for r in live) if grace is None and live else grace or 0)
        while any(r.proc.poll() is None for r in live) and time.monotonic() < limit:
            time.sleep(self.poll)
        for r in live:
            if r.proc.poll() is None:
                self.launcher.signal(r, r.proc, signals.SIGKILL)
            self._reap(r)

    # ------------------------------------------------------------ the loop

    def run(self) -> LocalJobResult:
        self.started = time.monotonic()
        deadlines = []
        if self.active_deadline is not None:
            deadlines.append((self.started + self.active_deadline, "DeadlineExceeded",
                              f"PyTorchJob {self.name} has failed because it was active longer than specified "
                              f"deadline ({self.active_deadline} s)"))
        if self.timeout is not None:
            deadlines.append((self.started + self.timeout, "LocalTimeout",
                              f"PyTorchJob {self.name} was stopped by the local runner after {self.timeout:g} s"))
        deadlines.sort()
        self._condition("Created", "PyTorchJobCreated", f"PyTorchJob {self.name} is created.")
        try:
            self._start_all()
            self._condition("Running", "PyTorchJobRunning", f"PyTorchJob {self.namespace}/{self.name} is running.")
            self._loop(deadlines)
        finally:
            # An exception here (or Ctrl-C) must not leave replicas behind.
            if any(r.proc is not None and not r.done for r in self.replicas):
                self._stop_all(grace=5)
            self.launcher.close(self)
        return LocalJobResult(
            name=self.name,
            succeeded=any(c["type"] == "Succeeded" and c["status"] == "True" for c in self.conditions),
            conditions=self.conditions, restarts=self.restarts, exit_codes=self.exit_codes,
            master_log=self.replicas[0].log_path, logs={r.name: r.log_path for r in self.replicas},
            chaos=[event for _, event in self.chaos_events], seconds=time.monotonic() - self.started,
        )

    def _loop(self, deadlines: list[tuple[float, str, str]]) -> None:
        master = self.replicas[0]
        while True:
            if deadlines and time.monotonic() >= deadlines[0][0]:
                self._stop_all()
                self._condition("Failed", deadlines[0][1], deadlines[0][2])
                return
            self._timed_chaos()
            exited = [(r, self._reap(r)) for r in self.replicas if not r.done and r.proc.poll() is not None]
            if any(r is master and code == 0 for r, code in exited):
                self._finish_after_master()
                return
            failed = [(r, code) for r, code in exited if code != 0]
            retry = [(r, code) for r, code in failed if retryable(r.policy, code)]
            if retry:
                if self.backoff_limit is not None and self.group_restarts >= self.backoff_limit:
                    self._stop_all()
                    self._condition("Failed", "BackoffLimitExceeded",
                                    f"PyTorchJob {self.name} has failed because it has reached the specified backoff "
                                    f"limit (backoffLimit {self.backoff_limit}); last: {_describe(retry)}")
                    return
                self._condition("Restarting", "PyTorchJobRestarting",
                                f"PyTorchJob {self.name} is restarting because {_count(retry)} replica(s) failed "
                                f"({_describe(retry)}).")
                self._stop_all()
                self.group_restarts += 1
                for r in self.replicas:
                    self.restarts[r.name] += 1
                self._start_all()
                self._condition("Running", "PyTorchJobRunning", f"PyTorchJob {self.namespace}/{self.name} is running.")
            elif failed:
                self._stop_all()
                self._condition("Failed", "PyTorchJobFailed",
                                f"PyTorchJob {self.name} is failed because {_count(failed)} replica(s) failed "
                                f"({_describe(failed)}).")
                return
            time.sleep(self.poll)

    def _finish_after_master(self) -> None:
        # Workers normally finish with the master; give them the grace period to do so, then stop them
        # (what cleanPodPolicy Running/All does on a cluster).
        live = [r for r in self.replicas if not r.done]
        limit = time.monotonic() + max((r.grace for r in live), default=0)
        while any(r.proc.poll() is None for r in live) and time.monotonic() < limit:
            time.sleep(self.poll)
        self._stop_all(grace=0)
        self._condition("Succeeded", "PyTorchJobSucceeded",
                        f"PyTorchJob {self.namespace}/{self.name} successfully completed.")


class _PathRewriter:
    """Maps container paths under a mountPath to the local directory of that volume."""

    def __init__(self, mounts: Mapping[str, Path]):
        self.mounts = sorted(mounts.items(), key=lambda kv: len(kv[0]), reverse=True)

    def __call__(self, token: str) -> str:
        for mount, local in self.mounts:
            if token == mount or token.startswith(mount.rstrip("/") + "/"):
                return str(local) + token[len(mount):]
        flag, eq, value = token.partition("=")
        if eq and flag.startswith("-"):
            rewritten = self(value)
            if rewritten != value:
                return f"{flag}={rewritten}"
        return token


class _ProcessLauncher:
    """Replicas as processes of this venv, paths under mounts rewritten to <workdir>/volumes (module docstring)."""

    def __init__(self, cwd: Path | None):
        self.cwd = cwd
        self.argv: dict[str, list[str]] = {}
        self.env: dict[str, dict[str, str]] = {}

    def prepare(self, job: _LocalJob) -> None:
        volumes = job.workdir / "volumes"
        for r in job.replicas:
            mounts: dict[str, Path] = {}
            for m in r.container.get("volumeMounts") or []:
                if m["mountPath"].rstrip("/") in _MACHINE_PATHS:
                    continue
                local = volumes / m["name"] / m.get("subPath", "")
                local.mkdir(parents=True, exist_ok=True)
                mounts[m["mountPath"].rstrip("/") or "/"] = local.resolve()
            rewrite = _PathRewriter(mounts)
            self.env[r.name] = {e["name"]: rewrite(str(e.get("value", ""))) for e in r.container.get("env") or []}
            argv = [rewrite(str(a)) for a in [*r.container["command"], *(r.container.get("args") or [])]]
            if argv[0] in ("python", "python3"):
                argv[0:1] = [sys.executable]
            elif argv[0] == "torchrun":
                argv[0:1] = [sys.executable, "-m", "torch.distributed.run"]
            self.argv[r.name] = argv

    def rendezvous(self, job: _LocalJob) -> tuple[str, int]:
        return "127.0.0.1", _free_port()  # a fresh port: nothing of the previous group can linger on it

    def start(self, job: _LocalJob, r: _Replica, injected: dict[str, str]) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if not _INHERITED_DROP.fullmatch(k)}
        env.update(self.env[r.name])
        env.update(injected)
        return subprocess.Popen(self.argv[r.name], env=env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)

    def signal(self, r: _Replica, proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def close(self, job: _LocalJob) -> None:
        pass


class _ContainerLauncher:
    """Replicas as podman containers of the manifest's image on a network of the job's own (module docstring)."""

    def __init__(self) -> None:
        from pipelines.image import podman  # only container mode needs podman (and imports it)

        podman.require("podman")
        self.podman = podman
        self.network = ""
        self.names: dict[str, str] = {}

    def prepare(self, job: _LocalJob) -> None:
        for image in sorted({r.container["image"] for r in job.replicas}):
            if not self.podman.image_exists(image):
                raise ManifestError(f"PyTorchJob {job.name}: image {image} is not in podman's store (nothing is "
                                    f"pulled here): make image builds it")
        for r in job.replicas:  # a container has a network of its own, as a pod: no loopback address to hand out
            r.pod["status"]["podIP"] = ""
        # Unique per run: two jobs of the same name (tests, sweeps) may run at once on this machine.
        self.network = f"arrcoc-{job.name}-{os.getpid()}-{threading.get_ident() % 10000}"[:60]
        self.podman.podman("network", "create", self.network)
        self.names = {r.name: f"{self.network}-{r.name}" for r in job.replicas}

    def rendezvous(self, job: _LocalJob) -> tuple[str, int]:
        master = job.replicas[0]
        ports = [p.get("containerPort") for p in master.container.get("ports") or [] if p.get("name") == PORT_NAME]
        return f"{job.name}-master-0", int(ports[0]) if ports else DEFAULT_PORT

    def start(self, job: _LocalJob, r: _Replica, injected: dict[str, str]) -> subprocess.Popen:
        podman = self.podman
        pod = f"{job.name}-{r.name}"  # the pod's name, and its headless service's
        host_dirs = {}
        for volume in podman.host_volumes(r.pod_spec, r.container):
            if volume["name"] == CHECKPOINT_VOLUME or "emptyDir" not in volume:
                path = job.workdir / "volumes" / volume["name"]  # the team's PVC or bucket: shared, kept
            else:
                path = job.workdir / "pods" / r.name / volume["name"]  # a new pod, a new emptyDir
                shutil.rmtree(path, ignore_errors=True)
            # always=True: files staged here by this (root) process must reach uid 1000, where on a cluster the
            # staging step runs as that uid itself.
            host_dirs[volume["name"]] = podman.prepare_host_dir(path, volume, podman.security(
                r.pod_spec, r.container)[2], always=True)
        podman.podman("rm", "--force", "--ignore", self.names[r.name], check=False)
        # No POD_IP: as on a cluster, the exporter then listens on all of the container's interfaces.
        env = {k: v for k, v in injected.items() if k != POD_IP_ENV}
        args = podman.run_args(r.pod_spec, r.container, name=self.names[r.name], host_dirs=host_dirs,
                               env=env, network=self.network, aliases=[pod], hostname=pod)
        return subprocess.Popen(["podman", "run", "--rm", *args], env=podman.environ(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)

    def signal(self, r: _Replica, proc: subprocess.Popen, sig: int) -> None:
        # To the container, not the podman client: a SIGKILLed client would leave its container running.
        self.podman.podman("kill", "--signal", str(int(sig)), self.names[r.name], check=False)

    def close(self, job: _LocalJob) -> None:
        for name in self.names.values():
            self.podman.podman("rm", "--force", "--ignore", name, check=False)
        if self.network:
            self.podman.podman("network", "rm", "--force", self.network, check=False)


def _count(exits: list[tuple[_Replica, int]]) -> str:
    kinds = sorted({r.rtype for r, _ in exits})
    return f"{len(exits)} {'/'.join(kinds)}"


def _describe(exits: list[tuple[_Replica, int]]) -> str:
    return ", ".join(f"{r.name} exit code {code}" for r, code in exits)
