"""Bad input: one line naming the field and the allowed values, exit code 2, nothing written to OUT."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.trainer_helpers import REPO, clean_env, run_trainer, trainer_cmd
from trainer.config import ConfigError, TrainConfig, load_yaml, parse_config

BAD = [
    (["--compress-vs-particularize", "1.2"], "compress_vs_particularize=1.2 is outside the allowed range [0, 1]"),
    (["--exploit-vs-explore", "-0.1"], "exploit_vs_explore=-0.1 is outside the allowed range [0, 1]"),
    (["--steps", "0"], "steps=0 must be a positive integer"),
    (["--steps", "-5"], "steps=-5 must be a positive integer"),
    (["--strategy", "zero9"], "strategy='zero9' is not one of ddp, deepspeed, fsdp"),
    (["--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
    (["--resume", "/no/such/checkpoint"], "resume='/no/such/checkpoint' must be auto, never or an existing"),
]


@pytest.mark.parametrize("args, message", BAD)
def test_bad_flags_exit_2_with_one_line(tmp_path, args, message):
    out = tmp_path / "out"
    result = run_trainer(*args, "--out", str(out), timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists()


@pytest.mark.parametrize("text, message", [
    ("steps: [1\n", "is not valid YAML"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("stepz: 3\n", "unknown key 'stepz'; allowed keys: steps,"),
    ("focus_vs_diversify: high\n", "focus_vs_diversify='high' is not a valid float"),
    ("steps: 2.5\n", "steps=2.5 is not a valid int"),
])
def test_malformed_config_file(tmp_path, text, message):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    out = tmp_path / "out"
    result = run_trainer("--config", str(path), "--out", str(out), timeout=60)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert str(path) in result.stderr
    assert not out.exists()


ACCEPTS = "it accepts tiny, a local checkpoint folder"


def _vit_folder(path):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    return path


@pytest.mark.parametrize("base_model, message", [
    (lambda tmp: "/nonexistent", "--base-model '/nonexistent': no such folder"),
    (lambda tmp: str(tmp), "is not a checkpoint folder (no config.json)"),
    (lambda tmp: str(_vit_folder(tmp / "vit")), "a vit checkpoint is neither a causal LM nor a Qwen-VL"),
    (lambda tmp: "someone/not-cached", "--base-model 'someone/not-cached': cannot load its config"),
])
def test_a_base_model_that_is_none_of_the_accepted_kinds(tmp_path, base_model, message):
    """`arrcoc train` as a new user runs it: the task is picked from --base-model, which is where a bad value is
    caught (before any Hugging Face traceback, and before --out is written)."""
    out = tmp_path / "out"
    result = subprocess.run([*trainer_cmd()[:1], "-m", "pipelines.cli", "train", "--base-model", base_model(tmp_path),
                             "--out", str(out)], cwd=REPO, env=clean_env(HF_HUB_OFFLINE="1"), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and ACCEPTS in lines[0], result.stderr
    assert lines[0].startswith("arrcoc train: error: --base-model")
    assert not out.exists()


def test_unreadable_config_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*missing.yaml: cannot read"):
        load_yaml(str(tmp_path / "missing.yaml"))


def test_yaml_keys_apply_and_flags_win(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("steps: 7\nfocus-vs-diversify: 0.25\nlr: 0.01\n")
    cfg = parse_config(["--config", str(path), "--lr", "0.5"])
    assert (cfg.steps, cfg.focus_vs_diversify, cfg.lr) == (7, 0.25, 0.5)
    assert cfg.batch_size == TrainConfig().batch_size
