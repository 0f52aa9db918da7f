"""Synthetic scenes with ground-truth relevance, the fixed vocabulary, and prepared-dataset files.

Sample i of a stream is drawn from numpy's RNG(seed + offset + i), so any sample can be regenerated
alone (exact resume needs no data state) and the train and eval streams never overlap.
"""
from __future__ import annotations

import contextlib
import functools
import io
import itertools
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.utils.data

from .errors import UserError
from .files import write_bytes_atomic, write_json_atomic

IMAGE_SIZE = 64  # the default scene size (TrainConfig.image_size); the scene layout below is drawn at this scale
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


@functools.lru_cache(maxsize=4)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:size, 0:size]


def _shape_mask(shape: str, x0: int, y0: int, size: int, image_size: int) -> np.ndarray:
    _YY, _XX = _pixel_grid(image_size)
    inside = (_XX >= x0) & (_XX < x0 + size) & (_YY >= y0) & (_YY < y0 + size)
    if shape == "square":
        return inside
    cx, cy = x0 + (size - 1) / 2, y0 + (size - 1) / 2
    if shape == "disk":
        return inside & ((_XX - cx) ** 2 + (_YY - cy) ** 2 <= (size / 2) ** 2)
    arm = max(2, size // 3)  # cross: a horizontal and a vertical bar through the centre
    return inside & ((np.abs(_XX - cx) < arm / 2 + 0.01) | (np.abs(_YY - cy) < arm / 2 + 0.01))


def make_scene(rng: np.random.Generator, image_size: int = IMAGE_SIZE, grid: int = GRID) -> dict[str, np.ndarray]:
    """One scene: image uint8 [S,S,3], query ids [2], answer id, relevance [G,G] in [0,1].

    Object sizes and positions are drawn at the 64-pixel scale and scaled by S/64 (at S=64 the scenes are
    exactly the original ones); the relevance grid is the G x G grid the model scores."""
    scale = image_size / IMAGE_SIZE

    def px(n, least: int = 1) -> int:  # a length (or, with least=0, a position) drawn at the 64-pixel scale
        return max(least, int(round(int(n) * scale)))

    _YY, _XX = _pixel_grid(image_size)
    image = np.clip(128 + rng.normal(0, 6, (image_size, image_size, 1)), 0, 255).repeat(3, axis=2)
    # Clutter: gray high-frequency checkerboards, salient to edge detectors, relevant to no query.
    for _ in range(rng.integers(1, 4)):
        size = int(rng.integers(8, 15))
        x0, y0 = (px(v, 0) for v in rng.integers(0, IMAGE_SIZE - size, 2))
        size = px(size)
        lo, hi = sorted(rng.integers(40, 220, 2))
        checker = ((_XX[:size, :size] // px(2) + _YY[:size, :size] // px(2)) % 2).astype(float)
        image[y0:y0 + size, x0:x0 + size] = (lo + (hi - lo + 40) * checker)[..., None].clip(0, 255)
    n_objects = int(rng.integers(2, 5))
    colours = rng.choice(len(COLOURS), n_objects, replace=False)
    owner = np.full((image_size, image_size), -1)
    shapes = []
    for k, colour in enumerate(colours):
        shape = SHAPES[rng.integers(len(SHAPES))]
        size = int(rng.integers(6, 23))
        x0, y0 = rng.integers(0, IMAGE_SIZE - size + 1, 2)
        mask = _shape_mask(shape, px(x0, 0), px(y0, 0), px(size), image_size)
        image[mask] = PALETTE[COLOURS[colour]]
        owner[mask] = k  # later objects occlude earlier ones
        shapes.append(shape)
    visible = [(owner == k).sum() / scale ** 2 for k in range(n_objects)]
    candidates = [k for k in range(n_objects) if visible[k] >= 12] or [int(np.argmax(visible))]
    target = candidates[rng.integers(len(candidates))]
    mask = owner == target
    cell = image_size // grid
    relevance = mask.reshape(grid, cell, grid, cell).mean(axis=(1, 3)).astype(np.float32)
    qtype = QTYPES[rng.integers(len(QTYPES))]
    if qtype == "SHAPE?":
        answer = shapes[target]
    else:
        ys, xs = np.nonzero(mask)
        answer = QUADRANTS[2 * int(ys.mean() >= image_size / 2) + int(xs.mean() >= image_size / 2)]
    return {
        "images": image.round().astype(np.uint8),
        "queries": np.array([TOKEN[qtype], TOKEN[COLOURS[colours[target]]]], dtype=np.int64),
        "answers": np.int64(TOKEN[answer]),
        "relevance": relevance,
    }


def generate(seed: int, start: int, count: int, offset: int = 0, image_size: int = IMAGE_SIZE,
             grid: int = GRID) -> dict[str, np.ndarray]:
    """Samples start..start+count-1 of the stream (seed, offset), stacked into arrays."""
    return SceneSource(seed, offset, image_size=image_size, grid=grid).batch(np.arange(start, start + count))


class SceneSource:
    """Where a run's samples come from: the synthetic stream, or a prepared dataset directory whose image size
    and relevance grid must be the run's (a mismatch would read the wrong relevance cells)."""

    def __init__(self, seed: int, offset: int = 0, path: str = "", image_size: int = IMAGE_SIZE, grid: int = GRID):
        self.seed, self.offset, self.image_size, self.grid = seed, offset, image_size, grid
        self.arrays = load_dataset(path) if path else None
        if self.arrays is not None:
            found = (self.arrays["images"].shape[1], self.arrays["relevance"].shape[1])
            if found != (image_size, grid):
                raise DatasetError(f"dataset {path}: images are {found[0]} pixels with a {found[1]}x{found[1]} "
                                   f"relevance grid; this run has image_size={image_size}, grid={grid}")

    def __len__(self) -> int:
        """A prepared dataset's size; the synthetic stream is endless, and one of its epochs is SYNTHETIC_EPOCH."""
        return SYNTHETIC_EPOCH if self.arrays is None else len(self.arrays["images"])

    def sample(self, index: int) -> dict[str, np.ndarray]:
        if self.arrays is None:
            return make_scene(np.random.default_rng(self.seed + self.offset + int(index)), self.image_size, self.grid)
        i = int(index) % len(self.arrays["images"])
        return {key: value[i] for key, value in self.arrays.items()}

    def batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        scenes = [self.sample(i) for i in indices]
        return {key: np.stack([s[key] for s in scenes]) for key in DATASET_KEYS}


# Samples per epoch of the synthetic stream: fixed, so that the shuffle order does not depend on --steps (which
# may change when a run is resumed). Large enough that no run here sees an epoch twice.
SYNTHETIC_EPOCH = 1 << 20


class SceneDataset(torch.utils.data.Dataset):
    """A map-style dataset of one sample per index (dicts of tensors); batches come from `collate`."""

    def __init__(self, source: SceneSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: torch.as_tensor(value) for key, value in self.source.sample(index).items()}


collate = torch.utils.data.default_collate  # stacks each key of the sample dicts


@contextlib.contextmanager
def loader_batches(loader: torch.utils.data.DataLoader) -> Iterator:
    """iter(loader), whose worker processes are stopped when the block ends (return, signal stop or error).
    torch stops them when the iterator is freed, but does nothing once the interpreter is exiting, and its fallback,
    SIGTERM, is ignored by our workers (quiet_worker): an iterator still alive at exit leaves multiprocessing's exit
    handler joining them forever. `_shutdown_workers` is that same stop (done event, then None to every worker)."""
    batches = iter(loader)
    try:
        yield batches
    finally:
        stop = getattr(batches, "_shutdown_workers", None)  # absent when num_workers is 0
        if stop is not None:
            stop()


def quiet_worker(_worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the trainer: a Ctrl-C reaches the whole process group, and a
    worker dying of it would fail the loader before the trainer could checkpoint."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


class ShardSampler(torch.utils.data.Sampler[int]):
    """This rank's sample indices, endlessly, epoch after epoch, starting after the first `skip` of them.

    Each epoch is torch's DistributedSampler at set_epoch(epoch): one permutation from (seed, epoch), every rank
    a different shard of it. A resumed run passes the count its rank had consumed and continues exactly there.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, skip: int = 0):
        self.dataset, self.num_replicas, self.rank, self.seed, self.skip = dataset, num_replicas, rank, seed, skip

    def __iter__(self):
        epoch_sampler = torch.utils.data.DistributedSampler(
            self.dataset, num_replicas=self.num_replicas, rank=self.rank, shuffle=True, seed=self.seed, drop_last=True)
        epoch, skip = divmod(self.skip, len(epoch_sampler))
        while True:
            epoch_sampler.set_epoch(epoch)
            yield from itertools.islice(iter(epoch_sampler), skip, None)
            epoch, skip = epoch + 1, 0


DATASET_KEYS = ("images", "queries", "answers", "relevance")
# Optional arrays of an eval dataset: images without questions or ground truth (prepare-data's image folder), which
# the evaluation report draws under every colour query.
UNLABELED_KEYS = ("folder_images", "folder_names")


def save_dataset(directory: str | Path, arrays: dict[str, np.ndarray], metadata: dict) -> Path:
    """Write scenes.npz and metadata.json into directory, each atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    write_bytes_atomic(directory / "scenes.npz", buffer.getvalue())
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


def load_unlabeled(directory: str | Path) -> tuple[np.ndarray, np.ndarray] | None:
    """A prepared dataset's unlabeled images and their names (UNLABELED_KEYS), or None when it has none."""
    try:
        with np.load(Path(directory) / "scenes.npz") as data:
            if not all(key in data.files for key in UNLABELED_KEYS) or not len(data[UNLABELED_KEYS[0]]):
                return None
            return data[UNLABELED_KEYS[0]], data[UNLABELED_KEYS[1]]
    except (OSError, ValueError) as exc:
        raise DatasetError(f"dataset {directory}: cannot read ({exc})") from None


class DatasetError(UserError):
    """A dataset directory that cannot be read or does not fit the run."""

