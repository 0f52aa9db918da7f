"""The seam between the training loop and a model family: what a task provides, and what a run gets from it.

Two tasks implement it: trainer/scene_task.py (synthetic scenes, the tiny LM) and trainer/vqa_task.py (JSONL
image-question-answer data, a Qwen-VL). trainer/tasks.py picks one from --base-model; nothing else asks which
family a model belongs to (docs/architecture.md).
"""
from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .config import TrainConfig
from .distributed import World


@dataclass
class RunParts:
    """What one training run needs from its task; everything in it is read before the run writes anything."""

    train_data: Dataset  # map-style, one sample per index
    collate: Callable  # samples -> one batch for model.forward
    evaluate: Callable[[torch.nn.Module], dict[str, float]]  # all ranks call it; every rank gets the means
    pictures: Callable[[torch.nn.Module], torch.Tensor | None]  # [N,3,H,W] in [0,1] for TensorBoard, rank 0
    finish: Callable[[torch.nn.Module, Path], None]  # all ranks, after the last step of a run


@dataclass
class Example:
    """One question on one image as the evaluation report draws it (trainer's numbers, pipelines/report.py's
    pictures): the relevance map, the tokens spent per cell, the ground truth where there is one."""

    image: np.ndarray  # [H,W,3] uint8
    question: str
    relevance: np.ndarray  # [G,G] blended r in [0,1]
    tokens: np.ndarray  # [G,G] visual tokens per cell (0 outside the selection)
    truth: np.ndarray | None  # [G,G] ground-truth relevance; None for an image without any
    answer: str | None  # the true answer; None without ground truth
    predicted: str
    label: str  # e.g. "eval scene 3" or a file name


@dataclass
class Review:
    """What the pipeline's report shows of a saved adapter besides its metrics."""

    baseline: dict[str, float]  # the same eval set with random allocation (random selection of as many tokens)
    facts: dict[str, object]  # a few lines about the eval set and the model
    examples: list[Example] = field(default_factory=list)  # eval examples with ground truth
    unlabeled: list[Example] = field(default_factory=list)  # images without questions, under every query
    budget_curve: dict | None = None  # trainer.vqa.budget_curve: accuracy against the visual-token budget
    extra_metrics: dict[str, float] = field(default_factory=dict)  # logged beside the metrics, not in the summary


class Task(abc.ABC):
    """One model family: how to build its model (fresh or from a saved adapter), its data and its evaluation."""

    name: str

    @abc.abstractmethod
    def build_model(self, cfg: TrainConfig, adapter_dir: Path | None = None) -> torch.nn.Module:
        """The adapter around its frozen base; with adapter_dir, the LoRA weights of a saved adapter (the other
        trainable modules are loaded by trainer.tasks.load_adapter)."""

    @abc.abstractmethod
    def run_parts(self, cfg: TrainConfig, world: World, model: torch.nn.Module) -> RunParts:
        """The training samples, the evaluation and the pictures of one run of `model`."""

    @abc.abstractmethod
    def evaluate(self, model: torch.nn.Module, cfg: TrainConfig, random_allocation: bool = False) -> dict[str, float]:
        """Single-process metrics over the first cfg.eval_size eval examples (the CLIs' and the pipeline's)."""

    @abc.abstractmethod
    def review(self, model: torch.nn.Module, cfg: TrainConfig, metrics: dict[str, float], samples: int) -> Review:
        """For the evaluation report of `metrics` (this model on cfg's eval set): the random-allocation baseline on
        the same set, a few facts, and up to `samples` examples to draw."""

    @abc.abstractmethod
    def eval_set_size(self, cfg: TrainConfig) -> int:
        """How many examples cfg.eval_data holds (a review scores each once)."""
