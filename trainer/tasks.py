"""The one place that tells the model families apart: `task_for` picks a task from --base-model, and
`load_adapter` rebuilds a saved adapter with the task its config names.

--base-model is `tiny` (the synthetic scenes' tiny LM), a local checkpoint folder, or a Hugging Face hub id (from
the local cache; otherwise downloaded, unless HF_HUB_OFFLINE=1). Its config's model_type decides: a Qwen-VL type is the
VQA task, a causal LM the scenes task; anything else is a one-line error naming the flag.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ConfigError, TrainConfig
from .model import ADAPTER_CONFIG, ADAPTER_MODULES, AdapterError
from .scene_task import SceneTask
from .task import Task
from .vlm import VLM_TYPES
from .vqa_task import VqaTask

SCENES, VQA = SceneTask(), VqaTask()
ACCEPTED = ("tiny, a local checkpoint folder (config.json and weights), or a Hugging Face hub id "
            "(in the local cache, or downloadable)")


def _bad(base_model: str, why: str) -> ConfigError:
    return ConfigError(f"--base-model {base_model!r}: {why}; it accepts {ACCEPTED}")


def base_model_type(base_model: str) -> str:
    """The model_type of --base-model's config ("tiny" for the built-in tiny LM); ConfigError when none loads."""
    if base_model == "tiny":
        return "tiny"
    path = Path(base_model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise _bad(base_model, "is not a checkpoint folder (no config.json)")
    elif base_model.startswith(("/", ".", "~")) or not base_model.strip():
        raise _bad(base_model, "no such folder")  # a path: never looked up on the hub
    from huggingface_hub import constants
    from transformers import AutoConfig

    name = str(path) if path.exists() else base_model
    try:  # a folder, or a hub id in the local cache: no network
        return AutoConfig.from_pretrained(name, local_files_only=True).model_type
    except (OSError, ValueError) as exc:
        if path.exists() or constants.HF_HUB_OFFLINE:
            raise _bad(base_model, f"cannot load its config ({_first_line(exc)})") from None
    try:  # a hub id not cached yet: the hub (a cluster pod downloads its base)
        return AutoConfig.from_pretrained(name).model_type
    except (OSError, ValueError) as exc:
        raise _bad(base_model, f"cannot load its config ({_first_line(exc)})") from None


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__


def task_for(cfg: TrainConfig) -> Task:
    """The task of cfg.base_model: a Qwen-VL is the VQA task, tiny or any causal LM the scenes task."""
    model_type = base_model_type(cfg.base_model)
    if model_type in VLM_TYPES:
        return VQA
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type == "tiny" or model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return SCENES
    raise _bad(cfg.base_model, f"a {model_type} checkpoint is neither a causal LM nor a Qwen-VL "
                               f"({', '.join(VLM_TYPES)})")


def load_adapter(directory: str | Path, **overrides) -> tuple[torch.nn.Module, Task]:
    """A saved adapter (OUT/adapter) on its base, and its task; overrides change evaluation settings only
    (eval_size, seed, eval_data)."""
    directory = Path(directory)
    try:
        values = json.loads((directory / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"adapter {directory}: no readable {ADAPTER_CONFIG} ({exc})") from None
    cfg = TrainConfig(**{**values, **overrides})
    task = task_for(cfg)
    model = task.build_model(cfg, adapter_dir=directory)
    modules = torch.load(directory / ADAPTER_MODULES, map_location="cpu", weights_only=True)
    model.load_state_dict(modules, strict=False)
    return model, task
