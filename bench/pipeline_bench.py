"""Pipeline numbers: compile time of the pipeline, and wall time of the local demo (`arrcoc demo`).

    .venv/bin/python bench/pipeline_bench.py [--compiles 5] [--skip-demo] [--steps N]

The demo runs with its default settings (those `make demo` uses) unless --steps is given; it trains for
real, so it takes minutes. kfp.local's own log lines carry per-task timestamps.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py

from common import markdown_table  # noqa: E402  (also puts the repository on sys.path)


def compile_seconds(count: int) -> list[float]:
    from pipelines.compile import compile_to

    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(count):
            began = time.perf_counter()
            compile_to(Path(tmp), data_bucket=False)
            times.append(time.perf_counter() - began)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compiles", type=int, default=5)
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--steps", type=int, help="override the demo's training steps")
    args = parser.parse_args()

    began = time.perf_counter()
    import pipelines.kfp_pipeline.pipeline  # noqa: F401  (the first compile would otherwise pay for the imports)
    import_s = time.perf_counter() - began
    times = compile_seconds(args.compiles)
    rows = [["import pipelines.kfp_pipeline.pipeline", import_s],
            [f"compile (median of {args.compiles})", statistics.median(times)]]
    if not args.skip_demo:
        from pipelines.kfp_pipeline.demo import run_demo

        with tempfile.TemporaryDirectory(prefix="demo-bench-") as tmp:
            began = time.perf_counter()
            result = run_demo(tmp, **({"steps": args.steps} if args.steps else {}))
            rows.append(["demo wall time (whole pipeline)", time.perf_counter() - began])
        print(f"\ndemo relevance_score={result.relevance_score:.4f}, registered={result.registered is not None}")
    print(markdown_table(["measure", "seconds"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
