"""Synthetic scenes with ground-truth relevance, the fixed vocabulary, and prepared-dataset files.

Sample i of a stream is drawn from numpy's RNG(seed + offset + i), so any sample can be regenerated
alone (exact resume needs no data state) and the train and eval streams never overlap.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

IMAGE_SIZE = 64
GRID = 8
EVAL_OFFSET = 1_000_000_000  # eval sample i uses RNG(seed + EVAL_OFFSET + i): disjoint from any train stream

SPECIALS = ["<pad>", "<bos>", "<eos>", "<sep>"]
QTYPES = ["SHAPE?", "WHERE?"]
COLOURS = ["red", "green", "blue", "yellow", "magenta", "cyan"]
SHAPES = ["square", "disk", "cross"]
QUADRANTS = ["top-left", "top-right", "bottom-left", "bottom-right"]
VOCAB = SPECIALS + QTYPES + COLOURS + SHAPES + QUADRANTS
TOKEN = {word: i for i, word in enumerate(VOCAB)}
ANSWER_IDS = [TOKEN[w] for w in SHAPES + QUADRANTS]

PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "magenta": (200, 50, 200),
    "cyan": (40, 200, 210),
}

_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]


def _shape_mask(shape: str, x0: int, y0: int, size: int) -> np.ndarray:
    inside = (_XX >= x0) & (_XX < x0 + size) & (_YY >= y0) & (_YY < y0 + size)
    if shape == "square":
        return inside
    cx, cy = x0 + (size - 1) / 2, y0 + (size - 1) / 2
    if shape == "disk":
        return inside & ((_XX - cx) ** 2 + (_YY - cy) ** 2 <= (size / 2) ** 2)
    arm = max(2, size // 3)  # cross: a horizontal and a vertical bar through the centre
    return inside & ((np.abs(_XX - cx) < arm / 2 + 0.01) | (np.abs(_YY - cy) < arm / 2 + 0.01))


def make_scene(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One scene: image uint8 [64,64,3], query ids [2], answer id, relevance [8,8] in [0,1]."""
    image = np.clip(128 + rng.normal(0, 6, (IMAGE_SIZE, IMAGE_SIZE, 1)), 0, 255).repeat(3, axis=2)
    # Clutter: gray high-frequency checkerboards, salient to edge detectors, relevant to no query.
    for _ in range(rng.integers(1, 4)):
        size = int(rng.integers(8, 15))
        x0, y0 = rng.integers(0, IMAGE_SIZE - size, 2)
        lo, hi = sorted(rng.integers(40, 220, 2))
        checker = ((_XX[:size, :size] // 2 + _YY[:size, :size] // 2) % 2).astype(float)
        image[y0:y0 + size, x0:x0 + size] = (lo + (hi - lo + 40) * checker)[..., None].clip(0, 255)
    n_objects = int(rng.integers(2, 5))
    colours = rng.choice(len(COLOURS), n_objects, replace=False)
    owner = np.full((IMAGE_SIZE, IMAGE_SIZE), -1)
    shapes = []
    for k, colour in enumerate(colours):
        shape = SHAPES[rng.integers(len(SHAPES))]
        size = int(rng.integers(6, 23))
        x0, y0 = rng.integers(0, IMAGE_SIZE - size + 1, 2)
        mask = _shape_mask(shape, int(x0), int(y0), size)
        image[mask] = PALETTE[COLOURS[colour]]
        owner[mask] = k  # later objects occlude earlier ones
        shapes.append(shape)
    visible = [(owner == k).sum() for k in range(n_objects)]
    candidates = [k for k in range(n_objects) if visible[k] >= 12] or [int(np.argmax(visible))]
    target = candidates[rng.integers(len(candidates))]
    mask = owner == target
    cell = IMAGE_SIZE // GRID
    relevance = mask.reshape(GRID, cell, GRID, cell).mean(axis=(1, 3)).astype(np.float32)
    qtype = QTYPES[rng.integers(len(QTYPES))]
    if qtype == "SHAPE?":
        answer = shapes[target]
    else:
        ys, xs = np.nonzero(mask)
        answer = QUADRANTS[2 * int(ys.mean() >= IMAGE_SIZE / 2) + int(xs.mean() >= IMAGE_SIZE / 2)]
    return {
        "images": image.round().astype(np.uint8),
        "queries": np.array([TOKEN[qtype], TOKEN[COLOURS[colours[target]]]], dtype=np.int64),
        "answers": np.int64(TOKEN[answer]),
        "relevance": relevance,
    }


def generate(seed: int, start: int, count: int, offset: int = 0) -> dict[str, np.ndarray]:
    """Samples start..start+count-1 of the stream (seed, offset), stacked into arrays."""
    return SceneSource(seed, offset).batch(np.arange(start, start + count))


class SceneSource:
    """Where a run's samples come from: the synthetic stream, or a prepared dataset directory."""

    def __init__(self, seed: int, offset: int = 0, path: str = ""):
        self.seed, self.offset = seed, offset
        self.arrays = load_dataset(path) if path else None

    def batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        if self.arrays is None:
            scenes = [make_scene(np.random.default_rng(self.seed + self.offset + int(i))) for i in indices]
            return {key: np.stack([s[key] for s in scenes]) for key in scenes[0]}
        idx = np.asarray(indices) % len(self.arrays["images"])
        return {key: value[idx] for key, value in self.arrays.items()}


DATASET_KEYS = ("images", "queries", "answers", "relevance")


def save_dataset(directory: str | Path, arrays: dict[str, np.ndarray], metadata: dict) -> Path:
    """Write scenes.npz and metadata.json into directory, each atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npz.tmp")
    with os.fdopen(fd, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    os.replace(tmp, directory / "scenes.npz")
    write_json_atomic(directory / "metadata.json", metadata)
    return directory


def load_dataset(directory: str | Path) -> dict[str, np.ndarray]:
    path = Path(directory) / "scenes.npz"
    try:
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as exc:
        raise DatasetError(f"dataset {path}: cannot read ({exc})") from None
    missing = [k for k in DATASET_KEYS if k not in arrays]
    if missing:
        raise DatasetError(f"dataset {path}: missing arrays {', '.join(missing)}; "
                           f"a training set needs {', '.join(DATASET_KEYS)}")
    return {k: arrays[k] for k in DATASET_KEYS}


class DatasetError(ValueError):
    exit_code = 2


def write_json_atomic(path: str | Path, obj) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
