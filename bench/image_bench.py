"""The trainer image here (podman, the project's Debian base): build times, size, and what running in it costs.

    .venv/bin/python bench/image_bench.py              # everything (~25 min on 2 shared cores)
    .venv/bin/python bench/image_bench.py --skip-cold  # keep the base and wheel caches (no debootstrap, no downloads)

- builds: cold (no base image, no wheel cache, no layer cache) against warm after a code change (base and
  wheels cached; the install layer reruns) and warm with nothing changed; each build's `pip freeze`, which
  must be the same;
- size: the image, the base under it, and the largest installed distributions;
- start-up: from launch to the trainer's first step line, one replica as a process of this venv against a
  container of the builder's pod (paired, alternating);
- the 2-replica job (pipelines/jobs/examples' shape, 16 steps) in process mode against container mode (paired).
Ratios are container (or warm) over process (or cold), measured in one run on the same machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, markdown_table

from pipelines.image import build, podman
from pipelines.jobs.local import run_local
from pipelines.jobs.pytorchjob import DEFAULT_IMAGE, build_pytorchjob, pytorch_container, to_manifest
from pipelines.jobs.team_config import TeamConfig

ARGS = ["--steps", "16", "--batch-size", "8", "--eval-every", "8", "--eval-size", "32", "--checkpoint-every", "4",
        "--log-every", "1", "--seed", "3"]
FREEZE = ("import importlib.metadata as m; "
          "print('\\n'.join(sorted(f'{d.name}=={d.version}' for d in m.distributions())))")


def freeze() -> list[str]:
    return podman.podman("run", "--rm", DEFAULT_IMAGE, "python", "-c", FREEZE).stdout.split()


def timed_build(**kwargs) -> dict:
    with open("/dev/null", "w") as sink:
        result = build.build(out=sink, **kwargs)
    result["freeze"] = freeze()
    return result


def builds(skip_cold: bool) -> list[list]:
    rows, freezes = [], []
    if not skip_cold:
        base = build.debian_base()
        podman.podman("rmi", "--force", base, check=False)
        for cache in build.CACHE.glob("wheels-*"):
            subprocess.run(["rm", "-rf", str(cache)], check=True)
        cold = timed_build(no_cache=True)
        rows.append(["cold (debootstrap, wheels, every layer)", cold])
    touch = REPO / "pipelines" / "image" / "_bench_code_change.py"  # untracked: in the wheel and the digest
    touch.write_text(f"# a code change for bench/image_bench.py at {time.time()}\n")
    try:
        changed = timed_build()
    finally:
        touch.unlink()
    rows.append(["warm, after a code change", changed])
    # Back to this checkout: the build above replaced its image, so the install reruns once more.
    rows.append(["warm, back to this checkout", timed_build()])
    rows.append(["warm, nothing changed", timed_build()])
    freezes = {tuple(r[1]["freeze"]) for r in rows}
    cold_s = rows[0][1]["seconds"]
    table = [[name, f"{r['seconds']:.0f}", f"{r['base_seconds']:.0f}", f"{r['wheel_seconds']:.0f}",
              f"{r['build_seconds']:.0f}", f"{r['seconds'] / cold_s:.2f}x"] for name, r in rows]
    print(markdown_table(["build", "total s", "base s", "wheelhouse s", "podman build s", "vs first row"], table))
    print(f"\npip freeze identical across the {len(rows)} builds: {len(freezes) == 1} "
          f"({len(rows[0][1]['freeze'])} distributions)")
    return rows


def size() -> None:
    image = podman.image_size(DEFAULT_IMAGE)
    base = podman.image_size(build.debian_base())
    listing = podman.podman("run", "--rm", DEFAULT_IMAGE, "sh", "-c",
                            "du -sm /usr/local/lib/python3.11/dist-packages/* | sort -rn | head -10").stdout
    print(f"\nimage {image / 1e9:.2f} GB, of which the Debian base {base / 1e9:.2f} GB; largest installed folders:")
    print(markdown_table(["MB", "folder"], [line.split("\t", 1) for line in listing.strip().splitlines()]))


def _job(name: str, workers: int) -> dict:
    return to_manifest(build_pytorchjob(name, team=TeamConfig.local_default(), trainer_args=ARGS, workers=workers,
                                        nproc_per_node="1", env={"OMP_NUM_THREADS": "1"}))


def _first_step(argv: list[str], env: dict | None) -> float:
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("step 1/"):
            seconds = time.monotonic() - started
            break
    else:
        raise RuntimeError(f"{argv[:3]}: no step line")
    proc.wait()
    return seconds


def startup(pairs: int) -> None:
    import os

    manifest = _job("bench-start", 0)
    replica = manifest["spec"]["pytorchReplicaSpecs"]["Master"]
    pod_spec, container = replica["template"]["spec"], pytorch_container(replica)
    env = {"MASTER_ADDR": "localhost", "MASTER_PORT": "23456", "WORLD_SIZE": "1", "RANK": "0", "PYTHONUNBUFFERED": "1"}
    process, containers = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(pairs):
            out = Path(tmp) / f"p{i}"
            argv = [sys.executable, "-m", "trainer", *ARGS, "--out", str(out)]
            process.append(_first_step(argv, {**os.environ, **env, "OMP_NUM_THREADS": "1"}))
            dirs = {v["name"]: podman.prepare_host_dir(Path(tmp) / f"c{i}" / v["name"], v, 1000)
                    for v in podman.host_volumes(pod_spec, container)}
            args = podman.run_args(pod_spec, container, name=f"bench-start-{os.getpid()}-{i}", host_dirs=dirs,
                                   env=env)
            containers.append(_first_step(["podman", "run", "--rm", *args], podman.environ()))
    p, c = statistics.median(process), statistics.median(containers)
    print(f"\nstart-up to the first step, median of {pairs} alternating pairs: process {p:.1f} s, container "
          f"{c:.1f} s: {c / p:.2f}x (process {', '.join(f'{x:.1f}' for x in process)}; container "
          f"{', '.join(f'{x:.1f}' for x in containers)})")


def two_replicas(pairs: int) -> None:
    process, containers, same = [], [], True
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(pairs):
            results = []
            for mode, store in (("process", process), ("container", containers)):
                workdir = Path(tmp) / f"{mode}-{i}"
                result = run_local(_job("bench-job", 1), workdir, timeout=900, log_stream=None,
                                   containers=mode == "container")
                assert result.succeeded, result.final
                store.append(result.seconds)
                results.append(json.loads((workdir / "volumes" / "checkpoints" / "bench-job" / "metrics.json")
                                          .read_text()))
            same = same and results[0] == results[1]
    p, c = statistics.median(process), statistics.median(containers)
    print(f"\n2-replica job (16 steps), median of {pairs} alternating pairs: process {p:.1f} s, container {c:.1f} s: "
          f"{c / p:.2f}x; same final metrics: {same}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-cold", action="store_true")
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    if missing := podman.missing("podman", "debootstrap"):
        print(f"skipped: {' and '.join(missing)} not installed (apt-get install -y {' '.join(podman.DEBIAN_PACKAGES)})")
        return 0
    builds(args.skip_cold)
    size()
    startup(args.pairs)
    two_replicas(max(1, args.pairs - 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
