"""podman as this machine's kubelet: a pod template's container as `podman run` arguments, volumes prepared as the
kubelet prepares them, and a pod's stop (preStop hook, then SIGTERM, then SIGKILL at the grace period's end).

What maps to what (docs/image.md has the table): command/args -> --entrypoint + arguments (Kubernetes' command
replaces the image's ENTRYPOINT and drops its CMD); env; workingDir; the pod's runAsUser/runAsGroup/fsGroup and
the container's readOnlyRootFilesystem, capabilities and allowPrivilegeEscalation; cpu/memory limits; every
volumeMount: a Memory emptyDir as tmpfs (/dev/shm as --shm-size), anything else as a host folder the caller
names, its group and mode set as the kubelet sets them for fsGroup (kubernetes pkg/volume/volume_linux.go
SetVolumeOwnership: group fsGroup, setgid folders, group rw; skipped when the root already matches, as
fsGroupChangePolicy OnRootMismatch) and an emptyDir's folder mode 0777 (pkg/volume/emptydir/empty_dir.go).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from kubernetes.utils.quantity import parse_quantity

from trainer.errors import UserError

CONTAINERS_CONF = Path(__file__).with_name("containers.conf")
# What `apt-get install` needs on Debian bookworm for every podman use here (netavark + aardvark-dns give a
# network's containers each other's names, as a cluster's DNS gives pods their services' names).
DEBIAN_PACKAGES = ("podman", "buildah", "runc", "netavark", "aardvark-dns", "debootstrap")
SHM_PATH = "/dev/shm"


class PodmanError(UserError):
    """podman (or a tool beside it) is missing, or a pod uses what this rehearsal cannot run: one line, exit 2."""


def missing(*tools: str) -> list[str]:
    return [t for t in tools if shutil.which(t) is None]


def require(*tools: str) -> None:
    """One line naming the Debian packages to install when any of `tools` is missing."""
    if absent := missing(*tools):
        raise PodmanError(f"{' and '.join(absent)} not found: as root, apt-get install -y {' '.join(DEBIAN_PACKAGES)}")


def environ() -> dict[str, str]:
    """This environment with the project's containers.conf (a CONTAINERS_CONF already set wins)."""
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    return env


def podman(*args: str, check: bool = True, timeout: float | None = None,
           capture: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], env=environ(), capture_output=capture, text=True, timeout=timeout)
    if check and result.returncode != 0:
        detail = (result.stderr or "").strip().splitlines()
        raise RuntimeError(f"podman {' '.join(args[:3])} ... exit {result.returncode}: {detail[-1] if detail else ''}")
    return result


def image_exists(ref: str) -> bool:
    return podman("image", "exists", ref, check=False).returncode == 0


def image_size(ref: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", ref).stdout.strip())


@contextlib.contextmanager
def docker_api(timeout: float = 30) -> Iterator[str]:
    """podman's Docker-compatible API (`podman system service`) on a unix socket of its own, for clients of the
    Docker API (kfp.local.DockerRunner through the docker SDK); yields the DOCKER_HOST value."""
    require("podman")
    with tempfile.TemporaryDirectory(prefix="arrcoc-podman-") as tmp:
        socket = Path(tmp) / "podman.sock"
        service = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{socket}"], env=environ(),
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + timeout
            while not socket.exists():
                if service.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"podman system service did not start: {service.stderr.read().decode()[-300:]}")
                time.sleep(0.1)
            with _not_found_as_docker_says_it():
                yield f"unix://{socket}"
        finally:
            service.terminate()
            try:
                service.wait(timeout=10)
            except subprocess.TimeoutExpired:
                service.kill()


@contextlib.contextmanager
def _not_found_as_docker_says_it() -> Iterator[None]:
    """podman 4.3 answers an inspect of a container it is removing with HTTP 500 "no such container", where Docker
    answers 404. kfp.local's DockerRunner runs each step with auto_remove and handles a container gone before it
    reads its logs or waits for it only as docker.errors.NotFound (kfp/local/docker_task_handler.py
    run_docker_container), which is what a step shorter than podman's start call (about a second here: the
    register step) meets. While the service runs, the docker SDK turns that 500 into the NotFound Docker's 404
    gives, so kfp takes the path it takes with Docker."""
    import docker.api.client
    import docker.errors

    original = docker.api.client.create_api_error_from_http_exception

    def translate(error):
        if error.response.status_code == 500 and "no such container" in (error.response.text or ""):
            raise docker.errors.NotFound(error, response=error.response, explanation=error.response.text) from error
        return original(error)

    docker.api.client.create_api_error_from_http_exception = translate
    try:
        yield
    finally:
        docker.api.client.create_api_error_from_http_exception = original


# ------------------------------------------------------------------------------------------------ the pod


def security(pod_spec: Mapping[str, Any], container: Mapping[str, Any]) -> tuple[int, int, int | None]:
    """(uid, gid, fsGroup) the container runs with; a runAsNonRoot pod without a uid is refused, as the kubelet
    refuses it when the image's user is not numeric."""
    pod_sc = pod_spec.get("securityContext") or {}
    sc = container.get("securityContext") or {}
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    gid = sc.get("runAsGroup", pod_sc.get("runAsGroup", uid))
    if uid is None:
        raise PodmanError(f"container {container.get('name')!r}: no runAsUser; this rehearsal runs pods with a "
                          f"numeric user only")
    if (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))) and int(uid) == 0:
        raise PodmanError(f"container {container.get('name')!r}: runAsNonRoot with runAsUser 0")
    return int(uid), int(gid), pod_sc.get("fsGroup")


def host_volumes(pod_spec: Mapping[str, Any], container: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The volumes `container` mounts that need a host folder (all but Memory emptyDirs)."""
    by_name = {v["name"]: v for v in pod_spec.get("volumes") or []}
    names = {m["name"] for m in container.get("volumeMounts") or []}
    return [by_name[n] for n in sorted(names) if n in by_name and not _in_memory(by_name[n])]


def prepare_host_dir(path: Path, volume: Mapping[str, Any], fs_group: int | None, *, always: bool = False) -> Path:
    """Create `path` as the kubelet would hand the volume to the pod's user (always: fix the group of everything
    below, as fsGroupChangePolicy Always; default OnRootMismatch)."""
    path.mkdir(parents=True, exist_ok=True)
    if "emptyDir" in volume:
        path.chmod(0o777)
    if fs_group is not None and os.geteuid() == 0:
        root = path.stat()
        wanted = stat.S_ISGID | stat.S_IRWXG
        if always or root.st_gid != fs_group or (root.st_mode & wanted) != wanted:
            for p in [path, *path.rglob("*")]:
                if p.is_symlink():
                    continue
                os.chown(p, -1, fs_group)
                mode = p.stat().st_mode
                extra = stat.S_IRGRP | stat.S_IWGRP | (stat.S_ISGID | stat.S_IXGRP if p.is_dir() else 0)
                p.chmod(stat.S_IMODE(mode) | extra)
    return path


def run_args(pod_spec: Mapping[str, Any], container: Mapping[str, Any], *, name: str,
             host_dirs: Mapping[str, Path], env: Mapping[str, str] | None = None, network: str | None = None,
             aliases: Sequence[str] = (), hostname: str | None = None,
             labels: Mapping[str, str] | None = None) -> list[str]:
    """`podman run` arguments (after `run`, through the image and its arguments) for `container` of `pod_spec`.
    host_dirs: volume name -> host folder, for every volume host_volumes lists. env: what the controller injects
    (the Training Operator's MASTER_ADDR, ...), set before the container's own env as the operator prepends it."""
    uid, gid, fs_group = security(pod_spec, container)
    sc = container.get("securityContext") or {}
    args = ["--name", name, "--user", f"{uid}:{gid}", "--pull", "never"]
    if hostname:
        args += ["--hostname", hostname]
    if network:
        args += ["--network", network, *[f"--network-alias={a}" for a in aliases]]
    if fs_group is not None:
        args += ["--group-add", str(fs_group)]
    if sc.get("readOnlyRootFilesystem"):
        # podman's --read-only adds tmpfs on /tmp, /var/tmp and /run by default; a pod gets none of them.
        args += ["--read-only", "--read-only-tmpfs=false"]
    if sc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    caps = sc.get("capabilities") or {}
    args += [f"--cap-drop={c}" for c in caps.get("drop") or []] + [f"--cap-add={c}" for c in caps.get("add") or []]
    limits = (container.get("resources") or {}).get("limits") or {}
    if "cpu" in limits:
        args += ["--cpus", f"{float(parse_quantity(limits['cpu'])):g}"]
    if "memory" in limits:
        args += ["--memory", str(int(parse_quantity(limits["memory"])))]
    if container.get("workingDir"):
        args += ["--workdir", container["workingDir"]]
    for key, value in (labels or {}).items():
        args += ["--label", f"{key}={value}"]
    values = dict(env or {})
    for e in container.get("env") or []:
        if "valueFrom" in e:
            raise PodmanError(f"container {container.get('name')!r}: env {e.get('name')!r} uses valueFrom, which "
                              f"is not rehearsed locally; give a value")
        values[e["name"]] = str(e.get("value", ""))
    for key, value in values.items():
        args += ["--env", f"{key}={value}"]
    args += _mounts(pod_spec, container, host_dirs)
    command = list(container.get("command") or [])
    if command:
        args += ["--entrypoint", json.dumps(command)]
    args.append(container["image"])
    if command or container.get("args"):
        args += [str(a) for a in container.get("args") or []]
    return args


def stop(name: str, container: Mapping[str, Any], grace: float, *, log: list[str] | None = None) -> int | None:
    """Stop a running pod container as the kubelet does on pod deletion: the preStop exec hook (within the
    grace period), then SIGTERM to PID 1 and SIGKILL when the rest of the grace period is over (at least 2 s
    after the hook, kubelet's minimumGracePeriodInSeconds). Returns the hook's exit code (None without a hook);
    `log` receives the hook's output."""
    started = time.monotonic()
    hook = (((container.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command")
    code = None
    if hook:
        try:
            result = podman("exec", name, *hook, check=False, timeout=grace)
            code = result.returncode
            if log is not None:
                log.append(result.stdout + result.stderr)
        except subprocess.TimeoutExpired:
            code = None
    left = max(2.0, grace - (time.monotonic() - started))
    podman("stop", "--time", str(int(round(left))), name, check=False, timeout=left + 30)
    return code


def exit_code(name: str) -> int:
    return int(podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip())


def _in_memory(volume: Mapping[str, Any]) -> bool:
    return (volume.get("emptyDir") or {}).get("medium") == "Memory"


def _mounts(pod_spec: Mapping[str, Any], container: Mapping[str, Any], host_dirs: Mapping[str, Path]) -> list[str]:
    by_name = {v["name"]: v for v in pod_spec.get("volumes") or []}
    args: list[str] = []
    for m in container.get("volumeMounts") or []:
        volume = by_name.get(m["name"])
        if volume is None:
            raise PodmanError(f"volumeMount {m['name']!r} names no volume of the pod")
        target = m["mountPath"]
        if _in_memory(volume):
            size = (volume.get("emptyDir") or {}).get("sizeLimit")
            if target.rstrip("/") == SHM_PATH:  # podman mounts its own /dev/shm; size it instead
                args += ["--shm-size", str(int(parse_quantity(size or "64Mi")))]
            else:
                args += ["--mount", f"type=tmpfs,destination={target}"
                         + (f",tmpfs-size={int(parse_quantity(size))}" if size else "")]
            continue
        if m["name"] not in host_dirs:
            raise PodmanError(f"volume {m['name']!r} has no host folder in this rehearsal")
        source = Path(host_dirs[m["name"]]) / m.get("subPath", "")
        source.mkdir(parents=True, exist_ok=True)
        ro = m.get("readOnly") or (volume.get("csi") or {}).get("readOnly") \
            or (volume.get("persistentVolumeClaim") or {}).get("readOnly")
        args += ["--mount", f"type=bind,source={source},destination={target}" + (",ro=true" if ro else "")]
    return args
