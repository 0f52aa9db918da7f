"""prepare-data's work: train and eval datasets in trainer.data's directory format (images, queries, answers,
relevance; no texture arrays: the trainer computes textures batched on its training device).

source "synthetic": train scenes 0..train_size-1 of the seed's train stream and eval scenes 0..eval_size-1 of
its eval stream, exactly the samples the trainer would generate itself, so a prepared run and an unprepared
one see the same data.

source = an image folder (jpg/png): such images have no queries and no ground truth, so they cannot train the
adapter nor score it. Training and the gate's evaluation still use the synthetic scenes of the seed; the
folder's images (centre-cropped, resized to 64x64) travel in the eval dataset as extra arrays
(`folder_images`, `folder_names`) and the evaluation report draws them under every colour
query. Unreadable files are named on stderr and skipped; a folder with no readable image fails.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
SYNTHETIC = "synthetic"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class PrepareError(ValueError):
    exit_code = 2


def read_folder(folder: str | Path, size: int = 64) -> tuple[np.ndarray, list[str], list[str]]:
    """Images of a folder as [N,size,size,3] RGB uint8, their file names, and the names that could not be read."""
    import cv2

    folder = Path(folder)
    if not folder.is_dir():
        raise PrepareError(f"source {str(folder)!r} is neither {SYNTHETIC!r} nor an existing image folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise PrepareError(f"source {folder}: no image files (allowed: {', '.join(IMAGE_SUFFIXES)})")
    images, names, unreadable = [], [], []
    for path in files:
        # imdecode of the bytes, not imread: imread cannot tell "missing" from "corrupt" and prints nothing useful.
        try:
            data = np.fromfile(path, dtype=np.uint8)
        except OSError:
            data = np.zeros(0, np.uint8)
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
        if bgr is None or bgr.size == 0:
            unreadable.append(path.name)
            continue
        h, w = bgr.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        square = bgr[top:top + side, left:left + side]
        interpolation = cv2.INTER_AREA if side >= size else cv2.INTER_LINEAR
        images.append(cv2.cvtColor(cv2.resize(square, (size, size), interpolation=interpolation), cv2.COLOR_BGR2RGB))
        names.append(path.name)
    if unreadable:
        print(f"prepare-data: skipped {len(unreadable)} unreadable image file(s) in {folder}: {', '.join(unreadable)}",
              file=sys.stderr)
    if not images:
        raise PrepareError(f"source {folder}: none of its {len(files)} image files could be read "
                           f"({', '.join(unreadable)})")
    return np.stack(images), names, unreadable


def prepare(source: str, seed: int, train_size: int, eval_size: int, train_dir: str | Path,
            eval_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write the two dataset directories; returns their metadata (also in each directory's metadata.json)."""
    from trainer.data import EVAL_OFFSET, generate, save_dataset

    for name, value in (("train_size", train_size), ("eval_size", eval_size)):
        if int(value) <= 0:
            raise PrepareError(f"{name}={value} must be a positive integer")
    train_size, eval_size, seed = int(train_size), int(eval_size), int(seed)
    # Read (and fail on) the folder before anything is written: a failed step leaves no half dataset behind.
    folder = None if source == SYNTHETIC else read_folder(source)

    common = {"source": source, "seed": seed, "image_shape": [64, 64, 3], "relevance_shape": [8, 8], "format": "trainer.data (scenes.npz + metadata.json)"}
    train = generate(seed, 0, train_size)
    train_meta = {**common, "split": "train", "count": train_size, "stream_offset": 0,
                  "training_images": SYNTHETIC}
    evaluation = generate(seed, 0, eval_size, EVAL_OFFSET)
    eval_meta = {**common, "split": "eval", "count": eval_size, "stream_offset": EVAL_OFFSET,
                 "folder_images": 0, "unreadable_files": []}
    if folder is not None:
        images, names, unreadable = folder
        evaluation["folder_images"] = images
        evaluation["folder_names"] = np.array(names)
        eval_meta.update(folder_images=len(names), unreadable_files=unreadable)
    save_dataset(train_dir, train, train_meta)
    save_dataset(eval_dir, evaluation, eval_meta)
    return train_meta, eval_meta
