"""TensorBoard event files under OUT/tensorboard: what rank 0 of a run plots while it trains.

`tensorboard --logdir OUT/tensorboard` (or a Kubeflow TensorBoard pointed at the run's bucket) shows the
training loss, learning rate, samples/s, every evaluation metric, and the allocation pictures of each evaluation.
"""
from __future__ import annotations

from pathlib import Path

import torch

EVENTS_DIR = "tensorboard"
# Inside the saved adapter: the run's loss and evaluation curves, for readers without TensorBoard (the
# pipeline's HTML report): {"loss": [{"step", "loss"}...], "eval": [{"step", <metric>...}...]}.
TRAINING_CURVES = "training_curves.json"


class Curves:
    """A SummaryWriter on rank 0; on every other rank (or when disabled) each call does nothing."""

    def __init__(self, out: Path, enabled: bool):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only where it writes

            self.writer = SummaryWriter(log_dir=str(Path(out) / EVENTS_DIR))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def images(self, step: int, tag: str, images: torch.Tensor | None) -> None:
        if self.writer is not None and images is not None:
            self.writer.add_images(tag, images.float().cpu(), step, dataformats="NCHW")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
