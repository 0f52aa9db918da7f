"""The Qwen-VL path: tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints built from configs and saved with
an offline tokenizer and image processor (trainer/tiny_vlm.py), and PNG + JSONL scenes whose answer depends on
one boxed object (trainer/vqa.py write_scene_jsonl). No network anywhere."""
from __future__ import annotations

import json
import signal
import subprocess

import pytest
import torch
from trainer_helpers import REPO, clean_env, free_port, read_metrics, run_trainer, sigterm_after_first_eval, trainer_cmd

from trainer.config import TrainConfig
from trainer.tiny_vlm import FAMILIES, build_tiny_vlm
from trainer.vlm import ArrCocVLM, kept_count, vlm_type
from trainer.vqa import (
    VqaSource,
    budget_curve,
    curve_table,
    evaluate_vqa,
    write_budget_curve,
    write_colour_jsonl,
    write_scene_jsonl,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    for family in FAMILIES:
        build_tiny_vlm(root / family, family)
    train = write_scene_jsonl(root / "train", 64, seed=0)
    evals = write_scene_jsonl(root / "eval", 16, seed=0, offset=1_000_000)
    return root, train, evals


def cfg_for(world, family="qwen2_vl", **kw):
    root, train, evals = world
    return TrainConfig(base_model=str(root / family), train_data=str(train), eval_data=str(evals), batch_size=4,
                       eval_size=8, **kw).validate()


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_scorers_and_lm_lora_only(world, family):
    cfg = cfg_for(world, family)
    assert vlm_type(cfg.base_model) == family
    torch.manual_seed(0)
    model = ArrCocVLM(cfg)
    batch = VqaSource(cfg.train_data, model.collate, cfg.max_bad_fraction).batch(range(4))
    model(batch)["loss"].backward()
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("participatory.") for n in trainable)
    assert not any("visual" in n for n in trainable), "the vision tower stays frozen, without LoRA"
    def reached(prefix):
        grads = [named[n].grad for n in trainable if prefix in n]
        return bool(grads) and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)

    assert reached("participatory.") and reached("lora_B")  # through the straight-through gate; into the LM
    # lora_A's gradient is B^T(...): zero while B is at its zero init, non-zero once B has taken a step
    torch.optim.SGD([named[n] for n in trainable], lr=0.1).step()
    model.zero_grad()
    model(batch)["loss"].backward()
    assert reached("lora_A")


@pytest.mark.parametrize("family", FAMILIES)
def test_all_tokens_reproduce_the_vlms_own_forward(world, family):
    """Keeping every visual token, our packed sequence (our embeddings, get_rope_index positions) gives the
    logits of the untouched model run on input_ids + pixel_values: kept tokens sit at their original positions."""
    cfg = cfg_for(world, family, token_fraction=1.0)
    model = ArrCocVLM(cfg).eval()
    batch = VqaSource(cfg.eval_data, model.collate, cfg.max_bad_fraction).batch([0])
    with torch.no_grad():
        seq = model._sequences(batch, True, None, "relevance", None, None)
        ours = model.base.lm_head(model.base.model.language_model(
            inputs_embeds=seq["inputs_embeds"], position_ids=seq["position_ids"],
            attention_mask=seq["attention_mask"], **seq["extra"]).last_hidden_state)
        with model.vlm.disable_adapter():
            theirs = model.base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                                mm_token_type_ids=(batch["input_ids"] == model.collate.image_token).int()).logits
            ours_base = model.base.lm_head(model.base.model.language_model(
                inputs_embeds=seq["inputs_embeds"], position_ids=seq["position_ids"],
                attention_mask=seq["attention_mask"], **seq["extra"]).last_hidden_state)
    length = int(batch["attention_mask"][0].sum())
    torch.testing.assert_close(ours_base[0, -length:], theirs[0, :length], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours, ours_base)  # a fresh LoRA starts as the identity (B = 0)


def test_budget_sets_how_many_visual_tokens_the_lm_reads(world):
    assert kept_count(TrainConfig(token_budget=5), 64) == 5
    assert kept_count(TrainConfig(token_fraction=0.25), 64) == 16
    assert kept_count(TrainConfig(token_budget=500), 64) == 64
    cfg = cfg_for(world, token_budget=5)
    model = ArrCocVLM(cfg)
    batch = VqaSource(cfg.eval_data, model.collate, cfg.max_bad_fraction).batch(range(3))
    out = model(batch)
    assert float(out["visual_tokens"]) == 5.0
    assert [len(s) for s in out["selected"]] == [5, 5, 5]
    # the allocator spends the budget where relevance is highest (no noise at evaluation)
    for r, sel in zip(out["relevance"], out["selected"]):
        assert set(sel.tolist()) == set(r.detach().topk(5).indices.tolist())


def test_budget_curve_table_and_png(world, tmp_path):
    cfg = cfg_for(world, budget_curve="0.125,0.5")
    model = ArrCocVLM(cfg)
    curve = budget_curve(model, cfg, VqaSource(cfg.eval_data, model.collate, cfg.max_bad_fraction))
    assert [row["fraction"] for row in curve["rows"]] == [0.125, 0.5]
    assert [row["visual_tokens"] for row in curve["rows"]] == [8.0, 32.0]  # 64 merged tokens per 64x64 scene
    assert curve["all_visual_tokens"] == 64.0
    write_budget_curve(curve, tmp_path)
    assert (tmp_path / "budget_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "budget_curve.md").read_text()
    assert "| ARR-COC | random | uniform | all tokens |" in table and table == curve_table(curve)
    assert json.loads((tmp_path / "budget_curve.json").read_text()) == curve


def test_bf16_keeps_the_vlm_base_in_bf16_and_trains_fp32_weights(world):
    from trainer.distributed import World
    from trainer.train import build_optimization, train_step

    cfg = cfg_for(world, precision="bf16")
    torch.manual_seed(0)
    model = ArrCocVLM(cfg)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    engine, optimizer, scheduler = build_optimization(model, cfg, World())
    batch = VqaSource(cfg.train_data, model.collate, cfg.max_bad_fraction).batch(range(4))
    noise = model.training_noise(batch, torch.Generator().manual_seed(0))
    assert noise.shape == (4, 64)
    loss = train_step(engine, model, optimizer, scheduler, [batch], [noise], cfg)
    assert torch.isfinite(loss)
    moments = [t for s in optimizer.state_dict()["state"].values() for k, t in s.items() if k != "step"]
    assert moments and all(t.dtype == torch.float32 for t in moments)
    answers, _ = model.generate(batch)  # the greedy decoding under autocast
    assert len(answers) == 4


def test_a_short_run_learns_to_keep_the_tokens_that_answer_the_question(world, tmp_path):
    """150 steps on images whose answer is the colour of one boxed cell out of 64, reading a quarter of the
    tokens: the trained adapter answers better than the untrained model reading every token and better than
    the trained model reading a random quarter (which misses the cell 3 times in 4)."""
    root = world[0]
    train = write_colour_jsonl(tmp_path / "train", 256, seed=0)
    evals = write_colour_jsonl(tmp_path / "eval", 32, seed=0, offset=1_000_000)
    out = tmp_path / "run"
    result = run_trainer("--base-model", str(root / "qwen2_vl"), "--train-data", str(train), "--eval-data",
                         str(evals), "--steps", "150", "--batch-size", "8", "--eval-size", "32", "--eval-every", "150",
                         "--checkpoint-every", "150", "--num-workers", "0", "--budget-curve", "0.25", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    trained = read_metrics(out)["vqa_accuracy"]
    random_selection = json.loads((out / "budget_curve.json").read_text())["rows"][0]["random"]
    cfg = TrainConfig(base_model=str(root / "qwen2_vl"), eval_data=str(evals), batch_size=8, eval_size=32).validate()
    torch.manual_seed(cfg.seed)
    untrained = ArrCocVLM(cfg)
    untrained_all = evaluate_vqa(untrained, cfg, VqaSource(str(evals), untrained.collate, 0.01), "all")["vqa_accuracy"]
    assert trained >= random_selection + 0.15, (trained, random_selection)
    assert trained >= untrained_all + 0.3, (trained, untrained_all)


def _args(world, out, steps=4, family="qwen2_vl"):
    root, train, evals = world
    return ["--base-model", str(root / family), "--train-data", str(train), "--eval-data", str(evals),
            "--steps", str(steps), "--batch-size", "2", "--eval-size", "2", "--eval-every", "2",
            "--checkpoint-every", "2", "--budget-curve", "0.25", "--out", str(out)]


def _train(world, out, *extra, steps=4):
    return run_trainer(*_args(world, out, steps), *extra)


@pytest.mark.slow  # three trainer processes; the synthetic path's twin of this test runs in make test
def test_training_reports_vqa_lines_and_resumes_exactly_after_sigterm(world, tmp_path):
    straight = tmp_path / "straight"
    result = _train(world, straight)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split("=")[0] for line in result.stdout.splitlines() if "=" in line]
    assert lines == ["vqa_accuracy", "relevance_score", "visual_tokens", "eval_loss"] * 2  # steps 2 and 4
    assert (straight / "budget_curve.png").is_file() and (straight / "adapter" / "arrcoc_modules.pt").is_file()

    interrupted = tmp_path / "interrupted"
    # SIGTERM once the first evaluation (step 2) is printed: midway
    code, err, stopped = sigterm_after_first_eval(trainer_cmd(*_args(world, interrupted)), timeout=120)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert 2 <= stopped < 4
    resumed = _train(world, interrupted)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped}" in resumed.stderr
    assert read_metrics(interrupted) == read_metrics(straight)


@pytest.mark.slow  # two trainer processes; the synthetic path's twins of these runs are tested in make test
@pytest.mark.parametrize("family, strategy, precision", [("qwen2_5_vl", "ddp", "fp32"), ("qwen2_vl", "fsdp", "bf16")])
def test_two_processes_with_the_operator_env(world, tmp_path, family, strategy, precision):
    """What the Training Operator injects for one process per pod (no LOCAL_RANK), on the Qwen-VL path: DDP, and
    FSDP2 with bf16 (sharded evaluation with generation, the budget curve and the gathered adapter)."""
    out = tmp_path / "run"
    port = str(free_port())
    envs = [clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(r)) for r in (0, 1)]
    args = [*_args(world, out, family=family), "--strategy", strategy, "--precision", precision]
    procs = [subprocess.Popen(trainer_cmd(*args), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for env in envs]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "vqa_accuracy=" in outs[0][0] and "vqa_accuracy=" not in outs[1][0]
    assert read_metrics(out)["step"] == 4 and (out / "budget_curve.png").is_file()
    assert (out / "adapter" / "arrcoc_modules.pt").is_file()


def test_evaluate_step_shows_the_budget_curve(world, tmp_path):
    from pipelines.kfp_pipeline.steps.evaluate import evaluate_adapter

    out = tmp_path / "run"
    result = _train(world, out, steps=2)
    assert result.returncode == 0, result.stderr[-3000:]
    evals = write_scene_jsonl(tmp_path / "eval", 4, seed=1, offset=2_000_000)  # what prepare-data writes
    values, baseline, page, summary, _ = evaluate_adapter(out / "adapter", evals.parent, 2, 0.1)
    assert {"vqa_accuracy", "relevance_score", "visual_tokens", "vqa_accuracy_all_tokens"} <= set(values)
    assert "vqa_accuracy_budget_0.25_uniform" in values and "vqa_accuracy" in baseline
    assert "VQA accuracy vs visual-token budget" in page and "data:image/png;base64," in page
    assert "| ARR-COC | random | uniform | all tokens |" in summary
