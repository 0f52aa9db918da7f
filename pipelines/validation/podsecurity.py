"""Pod templates inside any object we apply, and the Pod Security Standard 'restricted' (latest)."""
from __future__ import annotations

from collections.abc import Iterator

from pipelines.validation.findings import Doc, Finding

FieldPath = list  # field path parts: str keys and int indices

_TEMPLATE_PATHS = {
    "Deployment": ["spec", "template", "spec"],
    "StatefulSet": ["spec", "template", "spec"],
    "DaemonSet": ["spec", "template", "spec"],
    "ReplicaSet": ["spec", "template", "spec"],
    "Job": ["spec", "template", "spec"],
    "CronJob": ["spec", "jobTemplate", "spec", "template", "spec"],
    "PodTemplate": ["template", "spec"],
    "Pod": ["spec"],
}
_CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")
_ALLOWED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret", "image", "name",
}
_SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}


def pod_specs(obj: dict, prefix: FieldPath | None = None) -> Iterator[tuple[FieldPath, dict]]:
    """(path, pod spec) for every pod template in obj; PyTorchJob replicas included.
    Katib trial specs are expanded by the caller after placeholder substitution."""
    prefix = prefix or []
    kind = obj.get("kind")
    if kind == "PyTorchJob":
        replicas = (obj.get("spec") or {}).get("pytorchReplicaSpecs") or {}
        for rtype, replica in replicas.items():
            spec = ((replica or {}).get("template") or {}).get("spec")
            if isinstance(spec, dict):
                yield prefix + ["spec", "pytorchReplicaSpecs", rtype, "template", "spec"], spec
        return
    path = _TEMPLATE_PATHS.get(str(kind))
    if path is None:
        return
    node: object = obj
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict):
        yield prefix + path, node


def containers(spec: dict) -> Iterator[tuple[FieldPath, dict]]:
    for group in _CONTAINER_LISTS:
        for index, container in enumerate(spec.get(group) or []):
            if isinstance(container, dict):
                yield [group, index], container


def check_restricted(doc: Doc, path: FieldPath, spec: dict) -> Iterator[Finding]:
    pod_sc = spec.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            yield doc.finding(path + [key], "must be false or unset (Pod Security restricted)")
    for index, volume in enumerate(spec.get("volumes") or []):
        for vtype in set(volume) - _ALLOWED_VOLUMES:
            yield doc.finding(
                path + ["volumes", index, vtype],
                f"volume type {vtype} is not allowed (Pod Security restricted allows: "
                f"{', '.join(sorted(_ALLOWED_VOLUMES - {'name'}))})",
            )
    for index, sysctl in enumerate(pod_sc.get("sysctls") or []):
        if sysctl.get("name") not in _SAFE_SYSCTLS:
            yield doc.finding(path + ["securityContext", "sysctls", index, "name"], "unsafe sysctl")
    yield from _check_identity(doc, path, pod_sc, is_pod=True)
    pod_nonroot = pod_sc.get("runAsNonRoot") is True
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    for cpath, container in containers(spec):
        here = path + cpath
        sc = container.get("securityContext") or {}
        yield from _check_identity(doc, here, sc, is_pod=False)
        if sc.get("privileged"):
            yield doc.finding(here + ["securityContext", "privileged"], "must be false (Pod Security restricted)")
        if sc.get("allowPrivilegeEscalation") is not False:
            yield doc.finding(
                here + ["securityContext", "allowPrivilegeEscalation"], "must be false (Pod Security restricted)"
            )
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            yield doc.finding(here + ["securityContext", "capabilities", "drop"],
                              "must include ALL (Pod Security restricted)")
        for cap in caps.get("add") or []:
            if cap != "NET_BIND_SERVICE":
                yield doc.finding(
                    here + ["securityContext", "capabilities", "add"],
                    f"capability {cap} is not allowed (only NET_BIND_SERVICE; Pod Security restricted)",
                )
        nonroot = sc.get("runAsNonRoot")
        if nonroot is False or (nonroot is None and not pod_nonroot):
            yield doc.finding(here + ["securityContext", "runAsNonRoot"],
                              "must be true here or in the pod securityContext (Pod Security restricted)")
        seccomp = (sc.get("seccompProfile") or {}).get("type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            yield doc.finding(
                here + ["securityContext", "seccompProfile", "type"],
                "must be RuntimeDefault or Localhost here or in the pod securityContext (Pod Security restricted)",
            )
        for pindex, port in enumerate(container.get("ports") or []):
            if port.get("hostPort"):
                yield doc.finding(here + ["ports", pindex, "hostPort"],
                                  "host ports are not allowed (Pod Security restricted)")
        if sc.get("procMount") not in (None, "Default"):
            yield doc.finding(here + ["securityContext", "procMount"], "must be Default (Pod Security restricted)")


def _check_identity(doc: Doc, path: FieldPath, sc: dict, *, is_pod: bool) -> Iterator[Finding]:
    where = path + ["securityContext"]
    if sc.get("runAsUser") == 0:
        yield doc.finding(where + ["runAsUser"], "must not be 0 (Pod Security restricted)")
    if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
        yield doc.finding(where + ["seccompProfile", "type"], "Unconfined is not allowed (Pod Security restricted)")
    se_type = (sc.get("seLinuxOptions") or {}).get("type")
    if se_type not in (None, "", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"):
        yield doc.finding(where + ["seLinuxOptions", "type"], "SELinux type not allowed (Pod Security restricted)")
    if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
        yield doc.finding(where + ["appArmorProfile", "type"], "Unconfined is not allowed (Pod Security restricted)")
