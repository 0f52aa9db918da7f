"""A real scrape: Debian's Prometheus, on loopback, scrapes a local two-replica PyTorchJob of the real trainer with
the scrape configuration generated from the team's PodMonitoring (pipelines/monitoring/scrape.py, fed the local
runner's pods.json), and evaluates the team's alert rules generated with a short stall threshold. The series
arrive with the pods' labels, the stalled-training alert fires when the master is stopped with SIGSTOP and clears
after SIGCONT, and every query of the Grafana dashboard returns data.

No GPU here: the dashboard's DCGM queries read a stand-in exporter served by this test with synthetic values in
GKE's managed DCGM layout (the workload's namespace and pod on each series), and the trainer's own GPU-memory
series exist only on a CUDA device. Skips with a plain message when Prometheus is not installed.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from pipelines.jobs.local import PODS_FILE, run_local
from pipelines.jobs.pytorchjob import build_pytorchjob, to_manifest
from pipelines.jobs.team_config import TeamConfig
from pipelines.monitoring import alerts, dashboard, scrape

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="Prometheus is not installed (Debian: apt-get install "
                                                           "prometheus); the real scrape test needs its server")
NAMESPACE, JOB = "team-vision", "watched"
STALL_SECONDS = 8  # the rule's 600 s, shortened so that the test waits seconds
BOUND = 90  # seconds any one wait may take before the test fails
TRAINER = ["--steps", "100000", "--batch-size", "8", "--eval-size", "16", "--eval-every", "20",
           "--checkpoint-every", "10", "--log-every", "5", "--num-workers", "0", "--image-size", "32", "--grid", "4",
           "--k-max", "8"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, probe, bound: float = BOUND):
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {bound} s")


@dataclasses.dataclass
class Live:
    url: str
    pods: dict[str, dict]
    started: float
    log: io.StringIO

    def query(self, expr: str) -> list[dict]:
        return dashboard.api(self.url, "query", query=expr)["result"]

    def firing(self, name: str) -> list[dict]:
        return [a for a in dashboard.api(self.url, "alerts")["alerts"]
                if a["labels"]["alertname"] == name and a["state"] == "firing"]

    def signal_master(self, sig: int) -> None:
        os.killpg(int(self.pods[f"{JOB}-master-0"]["metadata"]["annotations"]["local-runner/pid"]), sig)


def dcgm_standin(pods: list[dict]) -> int:
    """GPU series as GKE's managed DCGM labels them (the workload's namespace, pod, container), synthetic values."""
    registry = CollectorRegistry()
    util = Gauge("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", ["gpu", "UUID", "modelName", "namespace", "pod",
                                                                      "container"], registry=registry)
    used = Gauge("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", ["gpu", "UUID", "modelName", "namespace",
                                                                              "pod", "container"], registry=registry)
    for i, pod in enumerate(pods):
        labels = ("0", f"GPU-standin-{i}", "NVIDIA L4 (stand-in)", NAMESPACE, pod["metadata"]["name"], "pytorch")
        util.labels(*labels).set(37 + 20 * i)
        used.labels(*labels).set(2048 + 512 * i)
    port = free_port()
    start_http_server(port, addr="127.0.0.1", registry=registry)
    return port


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    work = tmp_path_factory.mktemp("scrape")
    team = dataclasses.replace(TeamConfig.local_default(), backoff_limit=0)  # the teardown's SIGTERM ends the job
    manifest = to_manifest(build_pytorchjob(JOB, team=team, namespace=NAMESPACE, workers=1, trainer_args=TRAINER))
    log = io.StringIO()
    job = threading.Thread(target=run_local, args=(manifest, work / "job"),
                           kwargs={"timeout": 600, "log_stream": log}, daemon=True)
    job.start()
    pods_file = work / "job" / PODS_FILE

    def running() -> list[dict]:
        pods = json.loads(pods_file.read_text()) if pods_file.is_file() else []
        return pods if pods and all(p["status"]["phase"] == "Running" for p in pods) else []

    pods = wait_for("both replicas running", running)
    podmonitoring = yaml.safe_load(alerts.PODMONITORING.read_text())
    podmonitoring["metadata"]["namespace"] = NAMESPACE  # what the component's replacement does in a team overlay
    (work / "targets.json").write_text(json.dumps(scrape.file_sd_targets(pods)))
    configs = scrape.scrape_configs(podmonitoring, str(work / "targets.json"))
    for config in configs:  # the PodMonitoring's 30 s, shortened for the test
        config.update(scrape_interval="1s", scrape_timeout="1s")
    rules = alerts.team_rules(alerts.Thresholds(stall_seconds=STALL_SECONDS, stall_for="0s"))
    for group in rules["spec"]["groups"]:
        group["interval"] = "1s"  # the shipped 1m would make every wait here a minute long
    (work / "team-rules.yaml").write_text(yaml.safe_dump(alerts.rule_file(rules)))
    dcgm = dcgm_standin(pods)
    config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(work / "team-rules.yaml")],
              "scrape_configs": [*configs, {"job_name": "nvidia-dcgm-exporter", "scrape_interval": "1s",
                                            "scrape_timeout": "1s",
                                            "static_configs": [{"targets": [f"127.0.0.1:{dcgm}"]}]}]}
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    server = subprocess.Popen([PROMETHEUS, f"--config.file={work / 'prometheus.yml'}",
                               f"--storage.tsdb.path={work / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}",
                               "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return urllib.request.urlopen(f"{url}/-/ready", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for("Prometheus ready", ready, 30)
        yield Live(url, {p["metadata"]["name"]: p for p in pods}, time.time(), log)
    finally:
        for pod in json.loads(pods_file.read_text()):
            if pod["status"]["phase"] == "Running":
                pid = int(pod["metadata"]["annotations"]["local-runner/pid"])
                for sig in (signal.SIGCONT, signal.SIGTERM):
                    try:
                        os.killpg(pid, sig)
                    except ProcessLookupError:
                        pass
        job.join(timeout=60)
        server.terminate()
        server.wait(timeout=30)


def test_the_series_arrive_with_the_pods_labels(live):
    def two_replicas_stepping() -> list[dict]:
        result = live.query('arrcoc_train_step{job="arrcoc-trainer"} > 0')
        return result if len(result) == 2 else []

    series = wait_for("arrcoc_train_step of both replicas", two_replicas_stepping)
    by_pod = {s["metric"]["pod"]: s["metric"] for s in series}
    assert set(by_pod) == {f"{JOB}-master-0", f"{JOB}-worker-0"}
    master = by_pod[f"{JOB}-master-0"]
    assert {k: master[k] for k in ("namespace", "team", "run", "pytorchjob", "replica_type", "replica_index",
                                   "container", "instance")} == {
        "namespace": NAMESPACE, "team": "local", "run": JOB, "pytorchjob": JOB, "replica_type": "master",
        "replica_index": "0", "container": "pytorch", "instance": f"{JOB}-master-0:metrics"}
    assert [k for k in master if k.startswith("__")] == ["__name__"]  # discovery labels stay behind
    assert {s["metric"]["pod"] for s in live.query('up{job="arrcoc-trainer"} == 1')} == set(by_pod)
    wait_for("a first evaluation", lambda: live.query('arrcoc_eval_metric{metric="relevance_score"}'))
    wait_for("a checkpoint", lambda: live.query("arrcoc_checkpoint_duration_seconds_count > 0"))


def test_stalled_alert_fires_on_sigstop_and_clears_on_sigcont(live):
    wait_for("steps", lambda: live.query('arrcoc_train_step{job="arrcoc-trainer"} > 0'))
    assert live.firing("ArrcocTrainingStalled") == []
    expr = next(r["expr"] for r in alerts.team_rules(alerts.Thresholds(stall_seconds=STALL_SECONDS))["spec"]
                ["groups"][0]["rules"] if r["alert"] == "ArrcocTrainingStalled")
    live.signal_master(signal.SIGSTOP)  # the worker then waits in its next all-reduce: the whole run stalls
    stopped = time.monotonic()
    try:
        (alert,) = wait_for("ArrcocTrainingStalled firing", lambda: live.firing("ArrcocTrainingStalled"))
        fired_after = time.monotonic() - stopped
        assert alert["labels"]["run"] == JOB and alert["labels"]["namespace"] == NAMESPACE
        assert STALL_SECONDS - 1 <= fired_after < STALL_SECONDS + 30
        assert live.query(expr)  # the rule's expression itself, evaluated now
        assert live.query(f'up{{pod="{JOB}-master-0"}} == 0')  # a stopped process answers no scrape
    finally:
        live.signal_master(signal.SIGCONT)
    wait_for("ArrcocTrainingStalled cleared", lambda: not live.firing("ArrcocTrainingStalled"), 30)
    assert not live.query(expr)


def test_every_dashboard_query_returns_data(live, tmp_path):
    wait_for("a first evaluation", lambda: live.query('arrcoc_eval_metric{metric="relevance_score"}'))
    variables = {"namespace": NAMESPACE, "run": JOB, "__rate_interval": "10s"}
    empty = []
    for query in dashboard.queries(variables):
        if "arrcoc_gpu_memory" in query.expr and not torch.cuda.is_available():
            assert not live.query(query.expr)  # the trainer reports GPU memory only on a GPU
            continue
        if not live.query(query.expr):
            empty.append(f"{query.panel} {query.ref}: {query.expr}")
    assert empty == []
    # ARRCOC_DASHBOARD_PICTURE=docs/monitoring-dashboard.png keeps the picture (how the one in docs/ was made)
    picture = Path(os.environ.get("ARRCOC_DASHBOARD_PICTURE") or tmp_path / "dashboard.png")
    dashboard.render(live.url, variables, live.started - 5, time.time(), picture, step=1.0,
                     note="dashboards/arrcoc-training.json, rendered from the scrape test's Prometheus: a 2-replica "
                          "CPU run; GPU panels from a stand-in DCGM exporter with synthetic values; gap: SIGSTOP")
    assert picture.stat().st_size > 20_000


def test_the_local_config_for_a_runs_pods_passes_promtool(tmp_path):
    """`python -m pipelines.monitoring.scrape pods.json`: what an operator points a local Prometheus at."""
    pods = [{"metadata": {"name": "j-master-0", "namespace": "local", "labels": {"arrcoc.dev/run-id": "j"}},
             "spec": {"containers": [{"name": "pytorch", "ports": [{"name": "metrics", "containerPort": 9400}]}]},
             "status": {"podIP": "127.1.2.3", "phase": "Running"}}]
    (tmp_path / "pods.json").write_text(json.dumps(pods))
    config = scrape.local_config(tmp_path / "pods.json", tmp_path / "prom")
    checked = subprocess.run([shutil.which("promtool") or "promtool", "check", "config", str(config)],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    (group,) = json.loads((tmp_path / "prom" / "targets.json").read_text())
    assert group["targets"] == ["127.1.2.3:9400"]
    assert group["labels"]["__meta_kubernetes_pod_labelpresent_arrcoc_dev_run_id"] == "true"
