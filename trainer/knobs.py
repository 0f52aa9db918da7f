"""The trainer knobs a pipeline run or a Katib trial may set, and where each value comes from: one table.

TrainConfig (trainer/config.py) gives each knob its type and default. A knob with `pipeline` is a parameter of the
KFP pipeline and of its train component (KFP needs both signatures spelled out; tests/test_knobs.py fails when
they, the Katib trial flags or docs/pipeline.md disagree with this table). Adding a knob: a TrainConfig field, a
row here, and the KFP parameters the failing test asks for.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .config import TrainConfig

_DEFAULTS = TrainConfig()
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


@dataclass(frozen=True)
class Knob:
    name: str  # a TrainConfig field, the trainer's --name flag
    pipeline: bool = False  # a pipeline parameter, which the train step passes to the trainer
    trial: bool = False  # a flag of every Katib trial (at its TrainConfig default, or the team-config's value)
    searched: bool = False  # a trial parameter the Experiment may search (spec.parameters)
    team_config: str = ""  # the team-config key that sets it: for a pipeline run that leaves it "", and for trials

    @property
    def type(self) -> type:
        return _TYPES[{f.name: f.type for f in dataclasses.fields(TrainConfig)}[self.name]]

    @property
    def default(self):
        """TrainConfig's default."""
        return getattr(_DEFAULTS, self.name)

    @property
    def pipeline_default(self):
        """The pipeline parameter's default: "" (the team-config decides) for a knob the team-config sets."""
        return "" if self.team_config else self.default

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


KNOBS = (
    Knob("steps", pipeline=True, trial=True),
    Knob("batch_size", pipeline=True, trial=True),
    Knob("lr", pipeline=True, trial=True),
    Knob("eval_every", pipeline=True, trial=True),
    Knob("eval_size", pipeline=True, trial=True),  # the pipeline's prepare-data and evaluate use it too
    Knob("checkpoint_every", trial=True),
    Knob("resume", trial=True),
    Knob("seed", pipeline=True, trial=True),  # the pipeline's prepare-data uses it too
    Knob("strategy", pipeline=True, trial=True, team_config="trainStrategy"),
    Knob("precision", pipeline=True, trial=True, team_config="trainPrecision"),
    Knob("base_model", pipeline=True, trial=True, team_config="baseModel"),
    Knob("token_fraction", pipeline=True, trial=True),
    Knob("token_budget", pipeline=True, trial=True),
    Knob("max_bad_fraction", pipeline=True, trial=True),
    Knob("grad_accum", pipeline=True),
    Knob("activation_checkpointing", pipeline=True),
    Knob("compress_vs_particularize", pipeline=True, searched=True),
    Knob("exploit_vs_explore", pipeline=True, searched=True),
    Knob("focus_vs_diversify", pipeline=True, searched=True),
    # A pipeline run trains on what prepare-data wrote (staged by the train step); a trial on team-config's data.
    Knob("train_data", team_config="trainData"),
    Knob("eval_data", team_config="evalData"),
)
BY_NAME = {knob.name: knob for knob in KNOBS}
PIPELINE_KNOBS = tuple(knob for knob in KNOBS if knob.pipeline)
TRIAL_FLAGS = tuple(knob.name for knob in KNOBS if knob.trial)


def flags(config: TrainConfig, knobs=PIPELINE_KNOBS) -> list[str]:
    """Trainer flags for the knobs' values in config: `--name value`, on/off knobs as `--name` / `--no-name`."""
    args = []
    for knob in knobs:
        value = getattr(config, knob.name)
        if knob.type is bool:  # argparse.BooleanOptionalAction
            args.append(knob.flag if value else "--no-" + knob.flag[2:])
        else:
            args += [knob.flag, str(value)]
    return args
