"""Texture arrays on the training device, batched, against the model notes' per-image float64 loop.

Same 224x224 scenes (trainer.data at image_size 224) for both sides, same machine:
- ours: trainer.texture.cell_features on batches of --batch images, on the training device (CUDA when there is
  one, else the CPU: then the figures are CPU figures), what the model calls inside its forward;
- ours, compiled: the same under torch.compile (inductor), what `--compile` runs (compile time not counted);
- reference: bench/texture_reference.compute_texture_array, one image at a time (float64, full resolution);
- floor: one pass that only converts every pixel of the batch to float32 on the same device. Any torch
  implementation that reads each pixel as a float at least once (every channel but the positions is a per-pixel
  function pooled to the cells) is slower than this, so floor/reference bounds the speed-up reachable here.
Reports images/s and their ratio, and our process's peak RSS at N and 4N images (each in its own subprocess):
the batched path streams, so its memory stays flat in the number of images.

    .venv/bin/python bench/device_texture.py [--images 256] [--batch 64]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(1, str(ROOT))


def worker(side: str, path: Path, count: int, batch: int) -> dict:
    images = np.load(path, mmap_mode="r")
    n = len(images)
    if side == "reference":
        from texture_reference import compute_texture_array

        began = time.perf_counter()
        for i in range(count):
            compute_texture_array(np.asarray(images[i % n][..., ::-1]))  # the notes read BGR files
        seconds = time.perf_counter() - began
        device = "cpu"
    else:
        import torch

        from trainer.texture import cell_features

        torch.set_grad_enabled(False)  # as in the model's forward; a compiled warm-up with grad would recompile
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        if side == "floor":
            work = torch.Tensor.float
        elif side == "compiled":
            work = torch.compile(cell_features, dynamic=False)
        else:
            work = cell_features
        work(torch.from_numpy(np.ascontiguousarray(images[:batch])).to(dev))  # warm-up (and compile)
        sync()
        began = time.perf_counter()
        for start in range(0, count, batch):
            idx = [(start + i) % n for i in range(min(batch, count - start))]
            work(torch.from_numpy(images[idx]).to(dev, non_blocking=True))
        sync()
        seconds = time.perf_counter() - began
        device = dev.type
    return {"side": side, "images": count, "seconds": seconds, "device": device,
            "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_worker(side: str, path: Path, count: int, batch: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", side, "--data", str(path), "--images", str(count),
                          "--batch", str(batch)], check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--worker", choices=("ours", "compiled", "reference", "floor"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.data), args.images, args.batch)))
        return 0

    from common import markdown_table

    from trainer.data import generate

    with tempfile.TemporaryDirectory(prefix="device-texture-") as tmp:
        path = Path(tmp) / "images.npy"
        np.save(path, generate(seed=7, start=0, count=args.images, image_size=224)["images"])
        ref = run_worker("reference", path, args.images, args.batch)
        ours = run_worker("ours", path, args.images, args.batch)
        ours4 = run_worker("ours", path, 4 * args.images, args.batch)
        compiled = run_worker("compiled", path, args.images, args.batch)
        floor = run_worker("floor", path, args.images, args.batch)
    rate = {r["side"] + str(r["images"]): r["images"] / r["seconds"] for r in (ref, ours, ours4, compiled, floor)}
    print(f"texture arrays of 224x224 scenes; ours on {ours['device']} in batches of {args.batch}"
          f"{' (CPU figures)' if ours['device'] == 'cpu' else ''}\n")
    print(markdown_table(["path", "images", "images/s", "max RSS MiB"], [
        ["reference: per-image float64 loop", ref["images"], round(rate[f"reference{args.images}"]),
         round(ref["max_rss_mib"])],
        ["ours: cell_features, batched", ours["images"], round(rate[f"ours{args.images}"]), round(ours["max_rss_mib"])],
        ["ours: cell_features, batched", ours4["images"], round(rate[f"ours{4 * args.images}"]),
         round(ours4["max_rss_mib"])],
        ["ours: cell_features under torch.compile", compiled["images"], round(rate[f"compiled{args.images}"]),
         round(compiled["max_rss_mib"])],
        ["floor: every pixel to float32 once, nothing else", floor["images"], round(rate[f"floor{args.images}"]),
         round(floor["max_rss_mib"])],
    ]))
    print(f"\nspeed-up ours/reference: {rate[f'ours{args.images}'] / rate[f'reference{args.images}']:.1f}x; "
          f"our peak RSS at {4 * args.images} vs {args.images} images: "
          f"{ours4['max_rss_mib'] / ours['max_rss_mib']:.2f}x")
    reference = rate[f"reference{args.images}"]
    print(f"compiled/reference: {rate[f'compiled{args.images}'] / reference:.1f}x; floor/reference (the bound for "
          f"a torch texture that reads every pixel as a float): {rate[f'floor{args.images}'] / reference:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
