"""Texture arrays for image folders: our data-prep path against the reference loop (bench/texture_reference.py).

Same PNG files (synthetic scenes written once to a temporary folder), same machine; each side runs in its own
subprocess so that imports and peak memory do not mix:
- ours: pipelines.kfp_pipeline.steps.prepare_data.read_folder (decode, crop, resize, BGR->RGB) + textures_of
  (trainer.texture.texture_cv2: 13 channels pooled to 8x8, float32);
- reference: cv2.imread + the reference loop's compute_texture_array (full resolution, float64), np.array at the end.
Reports images/s and their ratio, and peak memory two ways: tracemalloc's peak (numpy buffers and Python
objects allocated by the run itself) and the subprocess's max RSS (includes its imports: torch for ours).

    .venv/bin/python bench/texture_bench.py [--images 2000] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # common.py, texture_reference.py
sys.path.insert(1, str(ROOT))


def write_images(folder: Path, count: int) -> None:
    import cv2

    from trainer.data import generate

    for start in range(0, count, 256):
        images = generate(seed=7, start=start, count=min(256, count - start))["images"]
        for i, rgb in enumerate(images):
            cv2.imwrite(str(folder / f"scene_{start + i:06d}.png"), rgb[..., ::-1])


def _ours(folder: Path):
    from pipelines.kfp_pipeline.steps.prepare_data import read_folder, textures_of

    images, _, _ = read_folder(folder)
    return textures_of(images)


def _reference(folder: Path):
    from texture_reference import prepare_folder

    return prepare_folder(folder)


def worker(side: str, folder: Path, repeat: int) -> dict:
    run = _ours if side == "ours" else _reference
    run(folder)  # warm-up: imports, first-call set-up, page cache
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        out = run(folder)
        times.append(time.perf_counter() - began)
    tracemalloc.start()
    run(folder)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"side": side, "images": int(out.shape[0]), "seconds": statistics.median(times),
            "output_shape": list(out.shape), "output_dtype": str(out.dtype), "output_mib": out.nbytes / 2**20,
            "tracemalloc_peak_mib": peak / 2**20,
            "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--worker", choices=("ours", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.folder), args.repeat)))
        return 0

    with tempfile.TemporaryDirectory(prefix="texture-bench-") as tmp:
        folder = Path(tmp)
        write_images(folder, args.images)
        results = {}
        for side in ("reference", "ours"):
            out = subprocess.run([sys.executable, __file__, "--worker", side, "--folder", str(folder),
                                  "--repeat", str(args.repeat)], check=True, capture_output=True, text=True, cwd=ROOT)
            results[side] = json.loads(out.stdout.strip().splitlines()[-1])
    from common import markdown_table

    ref, ours = results["reference"], results["ours"]
    print(f"texture arrays for {args.images} PNG files of 64x64 (median of {args.repeat} runs, same machine)\n")
    rows = [[r["side"], round(r["images"] / r["seconds"]), "x".join(map(str, r["output_shape"])), r["output_dtype"],
             r["output_mib"], r["tracemalloc_peak_mib"], round(r["max_rss_mib"])] for r in (ref, ours)]
    rows.append(["ratio ours/reference", f"{ref['seconds'] / ours['seconds']:.2f}x", "", "",
                 ours["output_mib"] / ref["output_mib"], ours["tracemalloc_peak_mib"] / ref["tracemalloc_peak_mib"],
                 f"{ours['max_rss_mib'] / ref['max_rss_mib']:.2f}"])
    header = ["path", "images/s", "output shape", "dtype", "output MiB", "tracemalloc peak MiB", "max RSS MiB"]
    print(markdown_table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
