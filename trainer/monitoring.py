"""The trainer's Prometheus metrics (prometheus_client), served on --metrics-port while a run lives.

Names follow Prometheus conventions: base units in the name, `_total` for counters, no run or pod labels of our
own (the scrape adds namespace, pod, team, run and pytorchjob from the pod's labels: the team's PodMonitoring,
kustomize/components/monitoring). Each pod serves one endpoint: the process with local rank 0 (the PyTorchJob
declares one `metrics` port per pod). Every replica reports its own progress, data wait and GPU memory; rank 0
alone reports evaluations (all ranks hold the same all-reduced means).

Nothing here waits for the device: the loop hands over values it already has on the host, the loss only at the
log interval where the loop syncs anyway, and GPU memory is read from the caching allocator's counters when a
scrape asks. What must survive a restart (the resume count, when the last checkpoint was taken) travels in
`history`, which every checkpoint carries. Which metric answers which question: docs/operations.md.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily

from .config import ConfigError, TrainConfig
from .distributed import World

# The port the PyTorchJob builder declares (named METRICS_PORT_NAME) and passes as --metrics-port. 9400 is free on
# a trainer pod; a pod has its own network, so every replica uses the same number.
DEFAULT_PORT = 9400
# Locally every replica shares this machine's network: the local runner gives each its own loopback address
# (pipelines/jobs/local.py) in this variable. On a cluster it is unset and the exporter listens on all of the
# pod's interfaces, which `kubectl port-forward` needs.
POD_IP_ENV = "POD_IP"
# Seconds a checkpoint save takes: LoRA + small modules save well under a second here; a sharded FSDP save of a
# large model on a GCS FUSE mount can take minutes.
CHECKPOINT_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
HISTORY_RESUMES = "resumes"
HISTORY_CHECKPOINT_TIME = "checkpointed_at"


class TrainingMetrics:
    """The exporter of one trainer process. Its methods are the loop's hooks; each costs a few microseconds."""

    def __init__(self, cfg: TrainConfig, world: World):
        self.world = world
        disable_created_metrics()  # no <counter>_created series: each would be one more series to store and pay for
        self.registry = registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=registry)  # process_start_time_seconds, resident memory, CPU seconds
        self.step = Gauge("arrcoc_train_step", "Optimizer steps the run has completed (continues after a resume)",
                          registry=registry)
        self.target_steps = Gauge("arrcoc_train_target_steps", "Optimizer steps the run is configured for",
                                  registry=registry)
        self.steps = Counter("arrcoc_train_steps", "Optimizer steps completed by this process", registry=registry)
        self.samples = Counter("arrcoc_train_samples", "Training samples this process consumed (rate: samples/s)",
                               registry=registry)
        self.progress = Gauge("arrcoc_train_progress_timestamp_seconds",
                              "Unix time of the last progress: start, a completed step, evaluation or checkpoint",
                              registry=registry)
        self.loss = Gauge("arrcoc_train_loss", "Mean training loss over the last log interval", registry=registry)
        self.learning_rate = Gauge("arrcoc_train_learning_rate", "Learning rate after the last logged step",
                                   registry=registry)
        self.data_wait = Counter("arrcoc_train_data_wait_seconds",
                                 "Seconds the loop waited for the DataLoader (rate: share of time input-bound)",
                                 registry=registry)
        self.resumes = Counter("arrcoc_train_resumes",
                               "Times this run resumed from a checkpoint (the count travels in the checkpoint)",
                               registry=registry)
        self.eval = Gauge("arrcoc_eval_metric", "The last evaluation's metrics, one series per metric name",
                          ["metric"], registry=registry)
        self.eval_step = Gauge("arrcoc_eval_step", "Optimizer step of the last evaluation", registry=registry)
        self.checkpoint_time = Gauge("arrcoc_checkpoint_last_timestamp_seconds",
                                     "Unix time of the last complete checkpoint (the run's start before its first)",
                                     registry=registry)
        self.checkpoint_step = Gauge("arrcoc_checkpoint_last_step", "Optimizer step of the last complete checkpoint",
                                     registry=registry)
        self.checkpoint_seconds = Histogram("arrcoc_checkpoint_duration_seconds",
                                            "Wall time of a checkpoint save, every rank taking part",
                                            buckets=CHECKPOINT_BUCKETS, registry=registry)
        if world.device.type == "cuda":
            registry.register(_GpuMemory(world.device))
        self.target_steps.set(cfg.steps)
        now = time.time()
        self.progress.set(now)
        self.checkpoint_time.set(now)
        self.server = None
        self.address = ""
        if cfg.metrics_port and world.local_rank == 0:
            self.address = self._serve(cfg.metrics_port)

    def _serve(self, port: int) -> str:
        host = os.environ.get(POD_IP_ENV) or "0.0.0.0"
        try:
            self.server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"metrics_port={port}: cannot listen on {host}:{port} ({exc.strerror}); choose a free "
                              f"port, or 0 to turn the exporter off") from None
        return f"http://{host}:{self.server.server_port}/metrics"

    # --- the loop's hooks -------------------------------------------------------------------------------------
    def resumed(self, step: int, history: dict) -> None:
        """After the resume attempt: step 0 is a fresh start; otherwise one more resume of this run."""
        self.step.set(step)
        if step:
            history[HISTORY_RESUMES] = history.get(HISTORY_RESUMES, 0) + 1
            self.checkpoint_step.set(step)
            if HISTORY_CHECKPOINT_TIME in history:
                self.checkpoint_time.set(history[HISTORY_CHECKPOINT_TIME])
        self.resumes.inc(history.get(HISTORY_RESUMES, 0))
        self.progress.set(time.time())

    def timed(self, batches: Iterator) -> Iterator:
        """The DataLoader's iterator, with the time each next() blocks added to arrcoc_train_data_wait_seconds."""
        return _TimedIterator(batches, self.data_wait)

    def step_done(self, step: int, samples: int) -> None:
        """A completed optimizer step of `samples` samples on this process."""
        self.step.set(step)
        self.steps.inc()
        self.samples.inc(samples)
        self.progress.set(time.time())

    def logged(self, loss: float, lr: float) -> None:
        """At the log interval, where the loop has synced the loss to the host anyway."""
        self.loss.set(loss)
        self.learning_rate.set(lr)

    def evaluated(self, step: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self.eval.labels(metric=name).set(value)
        self.eval_step.set(step)
        self.progress.set(time.time())

    @contextlib.contextmanager
    def checkpoint(self, step: int, history: dict):
        """Around a checkpoint save; the save time goes into the checkpoint so that a resumed run knows its age."""
        began = time.perf_counter()
        history[HISTORY_CHECKPOINT_TIME] = time.time()
        yield
        self.checkpoint_seconds.observe(time.perf_counter() - began)
        self.checkpoint_time.set(history[HISTORY_CHECKPOINT_TIME])
        self.checkpoint_step.set(step)
        self.progress.set(time.time())

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class _TimedIterator:
    """An iterator object, not a generator: it is freed the moment the loop drops it, and the DataLoader iterator
    with it, whose __del__ stops the worker processes (a suspended generator can outlive the loop; at exit
    multiprocessing then SIGTERMs the workers, which inherited the trainer's SIGTERM handler, and waits forever)."""

    def __init__(self, batches: Iterator, wait: Counter):
        self.batches, self.wait = batches, wait

    def __iter__(self):
        return self

    def __next__(self):
        began = time.perf_counter()
        batch = next(self.batches)
        self.wait.inc(time.perf_counter() - began)
        return batch


class _GpuMemory:
    """The caching allocator's counters for this process's GPU, read when a scrape asks (host-side, no sync)."""

    def __init__(self, device: torch.device):
        self.device = device

    def describe(self):
        return []

    def collect(self):
        gpu = str(self.device.index or 0)
        stats = (("allocated", torch.cuda.memory_allocated, "Bytes of GPU memory held by tensors"),
                 ("reserved", torch.cuda.memory_reserved, "Bytes of GPU memory the caching allocator holds"),
                 ("max_allocated", torch.cuda.max_memory_allocated, "Peak bytes held by tensors since the start"))
        for name, read, text in stats:
            family = GaugeMetricFamily(f"arrcoc_gpu_memory_{name}_bytes", text, labels=["gpu"])
            family.add_metric([gpu], float(read(self.device)))
            yield family
