"""Training configuration: one dataclass, a YAML file with the same keys, flags that win.

Every default is defined once, here. `parse_config(argv)` is shared by `arrcoc train` and
`python -m trainer` so the container command and the laptop command cannot drift apart.
Bad input raises ConfigError (exit code 2) with a one-line message naming the field.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from .errors import UserError

STRATEGIES = ("ddp", "deepspeed", "fsdp")
PRECISIONS = ("fp32", "bf16")
TENSIONS = ("compress_vs_particularize", "exploit_vs_explore", "focus_vs_diversify")


class ConfigError(UserError):
    """A bad flag or config-file value."""


@dataclass
class TrainConfig:
    # run
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_size: int = 256
    checkpoint_every: int = 50
    log_every: int = 10  # a progress line on stderr when it is not a terminal
    keep_checkpoints: int = 3
    out: str = "runs/train"
    resume: str = "auto"  # auto | never | PATH to a step directory
    seed: int = 0
    strategy: str = "ddp"
    deepspeed_config: str = ""  # empty: trainer/ds_zero2.json
    # GPU execution: none of these change what is learned except precision (bf16 rounding)
    precision: str = "fp32"  # bf16: autocast forward, frozen base weights in bf16, trainable weights fp32
    grad_accum: int = 1  # micro-batches per optimizer step; effective batch = batch_size * grad_accum * replicas
    activation_checkpointing: bool = False  # recompute the base LM's decoder layers in backward
    compile: bool = False  # torch.compile the model's forward
    num_workers: int = 2  # DataLoader worker processes: data generation and decoding stay off the loop's thread
    dist_timeout: int = 1800  # seconds a collective may wait, evaluation and checkpoint saves included
    metrics_port: int = 0  # serve Prometheus metrics on this port (trainer/monitoring.py); 0: off
    # data: empty means synthetic scenes generated from the seed; otherwise a prepared dataset directory
    train_data: str = ""
    eval_data: str = ""
    # the three tensions (what Katib tunes), each in [0, 1]
    compress_vs_particularize: float = 0.1
    exploit_vs_explore: float = 0.7
    focus_vs_diversify: float = 0.5
    # model
    base_model: str = "tiny"  # tiny | local path | hub id
    image_size: int = 64
    grid: int = 8
    k_max: int = 16  # cells selected at focus_vs_diversify = 0
    k_min: int = 2  # cells selected at focus_vs_diversify = 1
    max_tokens_per_cell: int = 16  # L in b_i = 1 + (L-1) * rhat_i^gamma
    gamma_min: float = 0.5
    gamma_max: float = 4.0
    sigma_max: float = 1.0  # Gumbel scale at exploit_vs_explore = 0
    scorer_hidden: int = 64
    lora_r: int = 8
    lora_alpha: int = 16
    aux_weight: float = 1.0  # BCE on selected cells; 0 leaves only the LM loss
    tiny_hidden: int = 64
    tiny_layers: int = 2
    tiny_heads: int = 4
    # Qwen-VL base (--base-model a Qwen2-VL / Qwen2.5-VL / Qwen3-VL folder; data: JSONL files, trainer/vqa.py)
    token_budget: int = 0  # visual tokens the LM reads per image; 0: token_fraction of the image's tokens
    token_fraction: float = 0.25
    max_bad_fraction: float = 0.01  # more bad examples than this in a data file stops the run
    max_answer_tokens: int = 4  # greedy generation length at evaluation
    budget_curve: str = "0.0625,0.125,0.25,0.5"  # token fractions of the accuracy-vs-budget curve

    def tensions(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in TENSIONS}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        for name in TENSIONS:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name}={value} is outside the allowed range [0, 1]")
        for name in ("steps", "batch_size", "eval_every", "eval_size", "checkpoint_every", "keep_checkpoints",
                     "log_every", "max_answer_tokens", "grad_accum", "dist_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be > 0")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers={self.num_workers} must be an integer >= 0 (0: load on the loop's thread)")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port={self.metrics_port} must be a TCP port in 1..65535, or 0 (no exporter)")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy={self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.resume not in ("auto", "never") and not Path(self.resume).is_dir():
            raise ConfigError(f"resume={self.resume!r} must be auto, never or an existing checkpoint directory")
        if not 1 <= self.k_min <= self.k_max <= self.grid * self.grid:
            raise ConfigError(f"k_min={self.k_min}, k_max={self.k_max} must satisfy "
                              f"1 <= k_min <= k_max <= {self.grid ** 2}")
        if self.token_budget < 0 or not 0 < self.token_fraction <= 1 or not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError(f"token_budget={self.token_budget}, token_fraction={self.token_fraction}, "
                              f"max_bad_fraction={self.max_bad_fraction}: need token_budget >= 0, token_fraction "
                              f"in (0, 1], max_bad_fraction in [0, 1]")
        try:
            curve = [float(v) for v in self.budget_curve.split(",") if v.strip()]
        except ValueError:
            curve = [-1.0]
        if not curve or not all(0 < v <= 1 for v in curve):
            raise ConfigError(f"budget_curve={self.budget_curve!r} must be comma-separated token fractions in (0, 1]")
        if self.image_size % self.grid:
            raise ConfigError(f"image_size={self.image_size} must be a multiple of grid={self.grid}")
        return self


_FIELD_TYPES = {f.name: f.type for f in fields(TrainConfig)}
_CASTS = {"int": int, "float": float, "str": str, "bool": bool}


def _coerce(name: str, value, source: str):
    kind = _FIELD_TYPES[name]
    try:
        if kind == "bool" and not isinstance(value, bool):
            raise ValueError
        if kind == "int" and (isinstance(value, bool) or isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return _CASTS[kind](value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {name}={value!r} is not a valid {kind}") from None


def load_yaml(path: str) -> dict:
    """Read a YAML config file whose keys are TrainConfig fields (dashes or underscores)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path}:{where} is not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of TrainConfig keys")
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in _FIELD_TYPES:
            raise ConfigError(f"config file {path}: unknown key {key!r}; allowed keys: {', '.join(_FIELD_TYPES)}")
        values[name] = _coerce(name, value, f"config file {path}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every TrainConfig field; defaults are None so that a YAML value is only overridden when given."""
    parser.add_argument("--config", metavar="FILE", help="YAML file with TrainConfig keys; flags win")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kwargs = {"dest": f.name, "default": None, "help": f"(default: {f.default})"}
        if f.name == "strategy":
            kwargs["metavar"] = "{" + ",".join(STRATEGIES) + "}"
        elif f.name == "precision":
            kwargs["metavar"] = "{" + ",".join(PRECISIONS) + "}"
        elif f.type == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.name in TENSIONS:
            kwargs["type"] = float
            kwargs["metavar"] = "[0,1]"
        elif f.name == "resume":
            kwargs["metavar"] = "{auto,never,PATH}"
        elif f.name == "base_model":
            kwargs["metavar"] = "{tiny,PATH_OR_ID}"
        else:
            kwargs["type"] = _CASTS[f.type]
        parser.add_argument(flag, **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    for f in fields(TrainConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    return TrainConfig(**values).validate()


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_config(argv: list[str] | None = None, prog: str = "python -m trainer") -> TrainConfig:
    parser = OneLineParser(prog=prog, description="Train the ARR-COC adapter.")
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))
