"""The cloud side (manifests/gcp, Config Connector objects) checked against the teams and the install it carries.

- Node pools: every team-config's node selector (TeamConfig.pod_node_selector) and tolerations match a pool: the
  pool has the labels (its own, plus the ones GKE adds: cloud.google.com/gke-nodepool, cloud.google.com/gke-spot
  for spot pools, cloud.google.com/gke-accelerator for GPU pools) and the team tolerates every taint of the pool
  and tolerates nothing the pool lacks. Every pool gives pods the GKE metadata server (Workload Identity).
- Fit: a replica of the team's PyTorchJob (the one builder's pod), plus the GCS FUSE sidecar when the team mounts a
  bucket and Katib's metrics collector when it runs as a trial, fits the pool's machine after GKE's reservations
  ("Plan GKE Standard node sizes", memory and CPU reservations: `allocatable`) and its GPUs.
- Buckets: a team-config dataBucket has a read-only grant, a checkpointBucket a read-write one, to the principal
  of the team's Workload Identity account, and a team principal holds nothing else.
- The control-plane firewall rule of a private cluster opens every port Kubeflow's admission webhooks listen on
  (with the install rendered: `arrcoc validate --platform`).
- The Filestore StorageClass puts instances on the cluster's network.
System DaemonSets also take from a node's allocatable; their requests are not modelled, so "fits" here is
necessary, not sufficient: leave the margin the pools' comments give.
"""
from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

from kubernetes.utils.quantity import parse_quantity

from pipelines.jobs.pytorchjob import GCSFUSE_SIDECAR_LIMITS, WORKLOAD_IDENTITY_ACCOUNT, build_pytorchjob, to_manifest
from pipelines.jobs.team_config import TeamConfig
from pipelines.validation.controller_pods import katib_config
from pipelines.validation.findings import Doc, Finding
from pipelines.validation.invariants import team_configs, tolerates

GIB = Decimal(2**30)
MIB = Decimal(2**20)
# Compute Engine machine types a pool may use: (vCPUs, memory in MiB), the API's guestCpus and memoryMb
# (Compute Engine docs, general-purpose E2 and accelerator-optimized G2 and A2 machine series). GPUs come from the
# pool's guestAccelerator. Add a type here, with its figures from those docs, before a pool uses it.
MACHINES = {
    "e2-standard-4": (4, 16384), "e2-standard-8": (8, 32768), "e2-standard-16": (16, 65536),
    "g2-standard-4": (4, 16384), "g2-standard-8": (8, 32768), "g2-standard-12": (12, 49152),
    "g2-standard-16": (16, 65536), "g2-standard-24": (24, 98304),
    "a2-highgpu-1g": (12, 87040), "a2-highgpu-2g": (24, 174080), "a2-highgpu-4g": (48, 348160),
    "a2-highgpu-8g": (96, 696320),
}
# GKE API taint effects (ContainerNodePool spec.nodeConfig.taint[].effect) as Kubernetes writes them
EFFECTS = {"NO_SCHEDULE": "NoSchedule", "PREFER_NO_SCHEDULE": "PreferNoSchedule", "NO_EXECUTE": "NoExecute"}
# Katib v0.19 pkg/apis/config/v1beta1/defaults.go: a metrics collector's requests when katib-config sets none
KATIB_COLLECTOR_REQUESTS = {"cpu": "50m", "memory": "10Mi"}
# Least privilege for a team's pods on its buckets (GKE docs, Cloud Storage FUSE CSI driver, access control)
READ_ROLE = "roles/storage.objectViewer"
WRITE_ROLE = "roles/storage.objectUser"
# ports GKE's own firewall rule already opens from a private cluster's control plane to its nodes
GKE_CONTROL_PLANE_PORTS = {443, 10250}


def allocatable(cpus: int, memory_mib: int) -> tuple[Decimal, Decimal]:
    """(CPU cores, memory bytes) a node offers pods, after GKE's reservations: CPU 6% of the first core, 1% of
    the next, 0.5% of the next 2, 0.25% of the rest; memory 255 MiB below 1 GiB, else 25% of the first 4 GiB, 20%
    of the next 4, 10% of the next 8, 6% of the next 112, 2% of the rest, and 100 MiB for the eviction threshold
    (GKE docs, "Plan GKE Standard node sizes", memory and CPU reservations)."""
    cores, reserved = Decimal(cpus), Decimal(0)
    for width, share in ((1, "0.06"), (1, "0.01"), (2, "0.005"), (10**6, "0.0025")):
        part = min(cores, Decimal(width))
        reserved += part * Decimal(share)
        cores -= part
    memory = Decimal(memory_mib) * MIB
    if memory < GIB:
        kept = memory - 255 * MIB
    else:
        left, held = memory, Decimal(0)
        for width, share in ((4, "0.25"), (4, "0.20"), (8, "0.10"), (112, "0.06"), (10**6, "0.02")):
            part = min(left, width * GIB)
            held += part * Decimal(share)
            left -= part
        kept = memory - held
    return Decimal(cpus) - reserved, kept - 100 * MIB


class Pool:
    def __init__(self, doc: Doc) -> None:
        self.doc = doc
        self.config = config = (doc.obj.get("spec") or {}).get("nodeConfig") or {}
        self.machine = str(config.get("machineType") or "")
        self.accelerators = {str(a.get("type")): int(a.get("count") or 0) for a in config.get("guestAccelerator") or []}
        self.labels = {str(k): str(v) for k, v in (config.get("labels") or {}).items()}
        self.labels["cloud.google.com/gke-nodepool"] = doc.name
        if config.get("spot"):
            self.labels["cloud.google.com/gke-spot"] = "true"
        for kind in self.accelerators:
            self.labels["cloud.google.com/gke-accelerator"] = kind
        self.taints = [{"key": t.get("key"), "value": str(t.get("value", "")),
                        "effect": EFFECTS.get(str(t.get("effect")), t.get("effect"))}
                       for t in config.get("taint") or []]
        self.metadata_mode = (config.get("workloadMetadataConfig") or {}).get("mode")

    def admits(self, selector: dict[str, str], tolerations: list[dict]) -> bool:
        return (all(self.labels.get(k) == v for k, v in selector.items())
                and all(tolerates(tolerations, taint) for taint in self.taints))


def check_cloud(docs: list[Doc]) -> Iterator[Finding]:
    pools = [Pool(d) for d in docs if d.kind == "ContainerNodePool"]
    if not pools:
        return  # manifests/gcp is not among the docs
    for pool in pools:
        if pool.machine not in MACHINES:
            yield pool.doc.finding(["spec", "nodeConfig", "machineType"], f"{pool.machine!r} is not in "
                                   f"pipelines/validation/gke.py MACHINES: add its vCPUs and memory from the Compute "
                                   f"Engine docs so teams can be checked against it")
        if pool.metadata_mode != "GKE_METADATA":
            yield pool.doc.finding(["spec", "nodeConfig", "workloadMetadataConfig", "mode"], "must be GKE_METADATA: "
                                   "pods on this pool otherwise get no Workload Identity credentials")
    if not any(not p.taints for p in pools):
        yield pools[0].doc.finding(["spec", "nodeConfig", "taint"], "no pool is untainted: Kubeflow and the KFP steps "
                                   "tolerate no taint (the steps only GKE's spot taint) and would never schedule")
    configs = team_configs(docs)
    config_docs = {d.namespace: d for d in docs if d.kind == "ConfigMap" and d.name == "team-config" and d.namespace}
    collector = _collector_requests(docs)
    for namespace, config in sorted(configs.items()):
        yield from _check_team_pool(config_docs[namespace], config, pools, collector)
    yield from _check_grants(docs, configs, config_docs)
    yield from _check_storage_class(docs)
    yield from _check_webhook_firewall(docs)


def _collector_requests(docs: list[Doc]) -> dict[str, str]:
    config = katib_config(docs) or {}
    for entry in (config.get("runtime") or {}).get("metricsCollectors") or []:
        if entry.get("kind") == "StdOut":
            return {**KATIB_COLLECTOR_REQUESTS, **((entry.get("resources") or {}).get("requests") or {})}
    return dict(KATIB_COLLECTOR_REQUESTS)


def replica_requests(config: TeamConfig, collector: dict[str, str]) -> tuple[Decimal, Decimal, int, list[str]]:
    """(cpu, memory bytes, GPUs, what was counted) of one replica pod as the builder makes it, with the GCS FUSE
    sidecar (its requests equal its limits annotations: gcs-fuse-csi-driver pkg/webhook/config.go,
    populateResource) and Katib's metrics collector (a trial's primary pod)."""
    job = to_manifest(build_pytorchjob("fit", team=config, workers=0))
    template = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    cpu, memory, gpus, parts = Decimal(0), Decimal(0), 0, []
    for container in template["spec"]["containers"]:
        requests = (container.get("resources") or {}).get("requests") or {}
        cpu += parse_quantity(str(requests.get("cpu", 0)))
        memory += parse_quantity(str(requests.get("memory", 0)))
        gpus += int(requests.get("nvidia.com/gpu", 0))
        parts.append(f"{container['name']} {requests.get('cpu')}/{requests.get('memory')}")
    annotations = (template.get("metadata") or {}).get("annotations") or {}
    if annotations.get("gke-gcsfuse/volumes") == "true":
        cpu += parse_quantity(GCSFUSE_SIDECAR_LIMITS["gke-gcsfuse/cpu-limit"])
        memory += parse_quantity(GCSFUSE_SIDECAR_LIMITS["gke-gcsfuse/memory-limit"])
        parts.append("gcsfuse sidecar " + "/".join(GCSFUSE_SIDECAR_LIMITS[f"gke-gcsfuse/{r}-limit"]
                                                   for r in ("cpu", "memory")))
    cpu += parse_quantity(collector["cpu"])
    memory += parse_quantity(collector["memory"])
    parts.append(f"Katib metrics collector {collector['cpu']}/{collector['memory']}")
    return cpu, memory, gpus, parts


def _check_team_pool(doc: Doc, config: TeamConfig, pools: list[Pool], collector: dict[str, str]) -> Iterator[Finding]:
    selector, tolerations = config.pod_node_selector(), config.tolerations
    matching = [p for p in pools if p.admits(selector, tolerations)]
    if not matching:
        offered = "; ".join(f"{p.doc.name}: labels {p.labels}, taints {[t['key'] for t in p.taints]}" for p in pools)
        yield doc.finding(["data", "capacity"], f"no node pool of manifests/gcp takes this team's replicas (node "
                          f"selector {selector}, tolerations of {[t.get('key') for t in tolerations]}): {offered}")
        return
    cpu, memory, gpus, parts = replica_requests(config, collector)
    for pool in matching:
        extra = [t for t in tolerations if not any(tolerates([t], taint) for taint in pool.taints)]
        if extra:
            yield doc.finding(["data", "tolerations"], f"tolerates {[t.get('key') for t in extra]}, which node pool "
                              f"{pool.doc.name} does not taint: the team's capacity and the pool disagree")
        if pool.machine not in MACHINES:
            continue
        cores, bytes_ = allocatable(*MACHINES[pool.machine])
        have_gpus = pool.accelerators.get(config.gpu_type, 0) if gpus else 0
        short = []
        if cpu > cores:
            short.append(f"cpu {cpu.normalize()} > {cores.normalize()}")
        if memory > bytes_:
            short.append(f"memory {memory / GIB:.2f}Gi > {bytes_ / GIB:.2f}Gi")
        if gpus > have_gpus:
            short.append(f"{gpus} x {config.gpu_type} > {have_gpus}")
        if short:
            yield doc.finding(["data", "cpuPerReplica"], f"a replica ({', '.join(parts)}) does not fit node pool "
                              f"{pool.doc.name} ({pool.machine} after GKE's reservations): {'; '.join(short)}")


def principal(member: str) -> tuple[str, str] | None:
    """(namespace, account) of a Workload Identity Federation principal for a Kubernetes service account."""
    parts = member.split("/subject/ns/", 1)
    if len(parts) != 2 or not parts[0].startswith("principal://iam.googleapis.com/projects/"):
        return None
    namespace, _, account = parts[1].partition("/sa/")
    return (namespace, account) if account else None


def _check_grants(docs: list[Doc], configs: dict[str, TeamConfig], config_docs: dict[str, Doc]) -> Iterator[Finding]:
    buckets = {d.name: str((d.obj.get("spec") or {}).get("resourceID") or d.name)
               for d in docs if d.kind == "StorageBucket"}
    pools = {str(((d.obj.get("spec") or {}).get("workloadIdentityConfig") or {}).get("workloadPool"))
             for d in docs if d.kind == "ContainerCluster"}
    grants: dict[tuple[str, str], set[tuple[str, str]]] = {}  # (namespace, account) -> {(bucket, role)}
    for doc in docs:
        if doc.kind != "IAMPolicyMember":
            continue
        spec = doc.obj.get("spec") or {}
        who = principal(str(spec.get("member") or ""))
        if who is None:
            continue
        pool = str(spec.get("member")).split("/workloadIdentityPools/", 1)[-1].split("/", 1)[0]
        if pools and pool not in pools:
            yield doc.finding(["spec", "member"], f"workload identity pool {pool!r} is not the cluster's ({pools})")
        ref = spec.get("resourceRef") or {}
        if ref.get("kind") != "StorageBucket" or spec.get("role") not in (READ_ROLE, WRITE_ROLE):
            yield doc.finding(["spec", "role"], f"{spec.get('role')} on {ref.get('kind')} for {who[0]}/{who[1]}: a "
                              f"team's pods get only {READ_ROLE} or {WRITE_ROLE} on one of its buckets")
            continue
        bucket = buckets.get(str(ref.get("name")), str(ref.get("external") or ref.get("name")))
        grants.setdefault(who, set()).add((bucket, str(spec.get("role"))))
    for namespace, config in sorted(configs.items()):
        held = grants.get((namespace, WORKLOAD_IDENTITY_ACCOUNT), set())
        for key, bucket, role in (("dataBucket", config.data_bucket, READ_ROLE),
                                  ("checkpointBucket", config.checkpoint_bucket, WRITE_ROLE)):
            if bucket and (bucket, role) not in held:
                yield config_docs[namespace].finding(["data", key], f"no {role} on bucket {bucket!r} for "
                                                     f"{namespace}/{WORKLOAD_IDENTITY_ACCOUNT} in manifests/gcp: the "
                                                     f"GCS FUSE mounts would get 403")
        if config.data_bucket and (config.data_bucket, WRITE_ROLE) in held:
            yield config_docs[namespace].finding(["data", "dataBucket"], f"{namespace}/{WORKLOAD_IDENTITY_ACCOUNT} may "
                                                 f"write {config.data_bucket!r}: the data bucket is read-only")


def _check_storage_class(docs: list[Doc]) -> Iterator[Finding]:
    networks = {str(((d.obj.get("spec") or {}).get("networkRef") or {}).get("name"))
                for d in docs if d.kind == "ContainerCluster"}
    for doc in docs:
        if doc.kind == "StorageClass" and doc.obj.get("provisioner") == "filestore.csi.storage.gke.io":
            network = (doc.obj.get("parameters") or {}).get("network", "default")
            if networks and network not in networks:
                yield doc.finding(["parameters", "network"], f"{network!r}: Filestore instances would join another "
                                  f"network than the cluster's ({', '.join(sorted(networks))}) and be unreachable")


def _webhook_ports(docs: list[Doc]) -> dict[int, str]:
    """Port each admission webhook's pods listen on -> the webhook configuration, from the rendered install."""
    services = {(d.namespace, d.name): d.obj for d in docs if d.kind == "Service"}
    workloads = [d for d in docs if d.kind in ("Deployment", "StatefulSet", "DaemonSet")]
    ports: dict[int, str] = {}
    for doc in docs:
        if doc.kind not in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"):
            continue
        for hook in doc.obj.get("webhooks") or []:
            ref = (hook.get("clientConfig") or {}).get("service")
            service = services.get((ref.get("namespace"), ref.get("name"))) if ref else None
            if service is None:
                continue
            for entry in (service.get("spec") or {}).get("ports") or []:
                if entry.get("port") != ref.get("port", 443):
                    continue
                target = entry.get("targetPort", entry.get("port"))
                if isinstance(target, str) and not target.isdigit():
                    target = _named_port(workloads, ref["namespace"], service, target)
                if target is not None:
                    ports.setdefault(int(target), f"{doc.name} ({ref['namespace']}/{ref['name']})")
    return ports


def _named_port(workloads: list[Doc], namespace: str, service: dict, name: str) -> int | None:
    selector = (service.get("spec") or {}).get("selector") or {}
    for doc in workloads:
        template = (doc.obj.get("spec") or {}).get("template") or {}
        labels = (template.get("metadata") or {}).get("labels") or {}
        if doc.namespace != namespace or not selector or any(labels.get(k) != v for k, v in selector.items()):
            continue
        for container in (template.get("spec") or {}).get("containers") or []:
            for port in container.get("ports") or []:
                if port.get("name") == name:
                    return int(port["containerPort"])
    return None


def _check_webhook_firewall(docs: list[Doc]) -> Iterator[Finding]:
    clusters = [d for d in docs if d.kind == "ContainerCluster"]
    private = [c for c in clusters if ((c.obj.get("spec") or {}).get("privateClusterConfig") or {}).get(
        "enablePrivateNodes")]
    needed = {p: w for p, w in _webhook_ports(docs).items() if p not in GKE_CONTROL_PLANE_PORTS}
    for cluster in private:
        if not needed:
            return  # the install is not rendered (arrcoc validate without --platform)
        source = (cluster.obj["spec"]["privateClusterConfig"]).get("masterIpv4CidrBlock")
        accounts = {str(((Pool(p).config.get("serviceAccountRef")) or {}).get("name"))
                    for p in docs if p.kind == "ContainerNodePool"}
        opened: set[int] = set()
        for doc in docs:
            spec = doc.obj.get("spec") or {}
            if doc.kind == "ComputeFirewall" and spec.get("direction", "INGRESS") == "INGRESS" \
                    and source in (spec.get("sourceRanges") or []):
                targets = {str(t.get("name") or t.get("external")) for t in spec.get("targetServiceAccounts") or []}
                if targets and not accounts <= targets:
                    yield doc.finding(["spec", "targetServiceAccounts"], f"the node pools run as {sorted(accounts)}; "
                                      f"this rule reaches only {sorted(targets)}")
                for rule in spec.get("allow") or []:
                    if rule.get("protocol") in ("tcp", "all"):
                        opened.update(int(p) for p in rule.get("ports") or [] if str(p).isdigit())
        missing = {p: w for p, w in sorted(needed.items()) if p not in opened}
        if missing:
            yield cluster.finding(["spec", "privateClusterConfig", "masterIpv4CidrBlock"], "no firewall rule lets the "
                                  f"control plane ({source}) reach these webhook ports: "
                                  + ", ".join(f"{p} ({w})" for p, w in missing.items())
                                  + ": every object they match would be refused")
