"""The trainer knobs (trainer/knobs.py) are the one list: the pipeline's signature, the train component's
signature and what its body passes on, the Katib trial's flags and docs/pipeline.md agree with it. Adding a knob
to the list, or a trainer flag to a signature, without the rest fails here and says what is missing."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from pipelines.jobs.team_config import KEYS
from pipelines.kfp_pipeline.components.train import train
from pipelines.kfp_pipeline.pipeline import RunParameters
from pipelines.kfp_pipeline.variants import VARIANTS, compiled_file
from pipelines.sweeps import trial_spec
from trainer.config import TENSIONS, TrainConfig
from trainer.knobs import KNOBS, PIPELINE_KNOBS, TRIAL_FLAGS

REPO = Path(__file__).resolve().parents[1]
FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
KFP_TYPES = {int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", str: "STRING", bool: "BOOLEAN"}


def test_every_knob_is_a_trainer_field_with_its_sources():
    assert all(k.name in FIELDS for k in KNOBS)
    assert len({k.name for k in KNOBS}) == len(KNOBS)
    assert all(k.team_config in KEYS for k in KNOBS if k.team_config)
    assert {k.name for k in KNOBS if k.searched} == set(TENSIONS)
    assert all(k.pipeline or k.trial or k.team_config for k in KNOBS), "a knob nobody sets"


def test_the_pipeline_signature_is_the_list():
    parameters = {f.name: f for f in dataclasses.fields(RunParameters)}
    trainer_flags = {name for name in parameters if name in FIELDS}
    assert trainer_flags == {k.name for k in PIPELINE_KNOBS}, \
        "RunParameters (pipeline.py) and trainer/knobs.py PIPELINE_KNOBS list different trainer flags"
    for knob in PIPELINE_KNOBS:
        field = parameters[knob.name]
        assert (field.type, field.default) == (knob.type, knob.pipeline_default), knob.name


@pytest.mark.parametrize("data_bucket", VARIANTS)
def test_the_compiled_pipeline_declares_each_knob_with_its_default(data_bucket):
    spec = next(yaml.safe_load_all(compiled_file(data_bucket).read_text()))
    declared = spec["root"]["inputDefinitions"]["parameters"]
    for knob in PIPELINE_KNOBS:
        assert declared[knob.name]["parameterType"] == KFP_TYPES[knob.type], knob.name
        assert declared[knob.name]["defaultValue"] == knob.pipeline_default, knob.name


def test_the_train_component_signature_is_the_list():
    inputs = {name: spec for name, spec in train.component_spec.inputs.items()
              if not spec.type.startswith("system.")}  # parameters: train_data and eval_data are the datasets
    assert {name for name in inputs if name in FIELDS} == {k.name for k in PIPELINE_KNOBS}, \
        "the train component (components/train.py) and PIPELINE_KNOBS list different trainer flags"
    kfp_types = {int: "Integer", float: "Float", str: "String", bool: "Boolean"}
    for knob in PIPELINE_KNOBS:
        assert inputs[knob.name].type == kfp_types[knob.type], knob.name


def test_the_train_component_passes_every_knob_on(monkeypatch):
    """Its body builds the run's TrainConfig from its arguments: each knob, set to a value of its own, arrives."""
    import pipelines.kfp_pipeline.steps.train as step

    seen = {}
    monkeypatch.setattr(step, "train_step", lambda *args, **kwargs: seen.update(knobs=args[4]))
    values = {k.name: {int: 1000 + i, float: 0.001 * (i + 1), str: f"value-{i}", bool: True}[k.type]
              for i, k in enumerate(PIPELINE_KNOBS)}
    train.python_func(train_data=None, eval_data=None, adapter=None, job=None, backend="local", run_id="r", image="i",
                      workers=1, nproc_per_node="", checkpoint_pvc="", timeout_minutes=1, delete_policy="always",
                      data_bucket=False, **values)
    assert {name: getattr(seen["knobs"], name) for name in values} == values


def _trial_flags(text: str) -> list[str]:
    experiment = yaml.safe_load(text)
    master = experiment["spec"]["trialTemplate"]["trialSpec"]["spec"]["pytorchReplicaSpecs"]["Master"]
    return [a for a in master["template"]["spec"]["containers"][0]["args"] if a.startswith("--")]


def test_the_katib_trial_passes_the_lists_trial_flags_and_searches_its_searched_knobs():
    experiment = trial_spec.EXPERIMENT.read_text()
    searched = {p["name"] for p in yaml.safe_load(experiment)["spec"]["parameters"]}
    assert searched == {k.name for k in KNOBS if k.searched}
    assert TRIAL_FLAGS == tuple(k.name for k in KNOBS if k.trial)
    # the base team-config sets no trainData/evalData: the trial trains on the trainer's own scenes
    # then the flags the builder owns: the run's folder and the exporter's port (pipelines/jobs/pytorchjob.py)
    expected = [k.flag for k in KNOBS if k.trial] + [k.flag for k in KNOBS if k.searched] + ["--out", "--metrics-port"]
    assert _trial_flags(experiment) == expected


def test_the_pipeline_docs_table_is_the_signature():
    """docs/pipeline.md "Parameters": one row per parameter (names in backticks in the first column); a knob the
    team-config sets names its key there."""
    text = (REPO / "docs" / "pipeline.md").read_text()
    table = text[text.index("## Parameters"):]
    table = table[:table.index("\n\n", table.index("|---"))]
    rows = [line for line in table.splitlines()[3:] if line.startswith("|")]
    documented = {}
    for row in rows:
        first = row.split("|")[1]
        for name in re.findall(r"`([a-z_]+)`", first):
            assert name not in documented, f"{name} has two rows"
            documented[name] = row
    assert set(documented) == {f.name for f in dataclasses.fields(RunParameters)}, \
        "docs/pipeline.md's parameter table and RunParameters differ"
    for knob in PIPELINE_KNOBS:
        if knob.team_config:
            assert knob.team_config in documented[knob.name], knob.name
