"""The Qwen-VL path: tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints built from configs and saved with
an offline tokenizer and image processor (trainer/tiny_vlm.py), and PNG + JSONL scenes whose answer depends on
one boxed object (trainer/vqa.py write_scene_jsonl). No network anywhere."""
from __future__ import annotations

import itertools
import json
import random
import signal
import subprocess

import pytest
import torch
from trainer_helpers import (
    REPO,
    assert_bf16_base_and_fp32_trainables,
    assert_fp32_optimizer_state,
    attention_runs_per_layer,
    clean_env,
    free_port,
    read_metrics,
    run_trainer,
    sigterm_after_first_eval,
    trainer_cmd,
)

from trainer.config import TrainConfig
from trainer.tasks import task_for
from trainer.tiny_vlm import FAMILIES, build_tiny_vlm
from trainer.vlm import ArrCocVLM, kept_count, lod_allocation, lod_allocations, lod_count, region_members
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
    cfg = cfg_for(world, family, aux_weight=0.0)  # the LM's gradient alone
    assert task_for(cfg).name == "vqa"
    torch.manual_seed(0)
    model = ArrCocVLM(cfg)
    batch = VqaSource(cfg.train_data, model.collate, cfg.max_bad_fraction).batch(range(4))
    scored = []  # Q [images, n] as the scorer returns it; r = c*(P+S)/2 + (1-c)*Q passes its gradient on to Q

    def keep(_module, _inputs, q):
        q.retain_grad()
        scored.append(q)

    model.participatory.register_forward_hook(keep)
    out = model(batch)
    out["loss"].backward()
    (q,) = scored
    # the gate multiplies every token before pooling: tokens read at full detail and those pooled into a coarse
    # token both pass the LM's gradient to r; unread tokens get none
    for grad, reading in zip(q.grad, out["readings"]):
        assert int(reading.full) > 0 and int(reading.coarse) > 0
        full = reading.group[reading.weight[:, 1] == 0, 0]
        coarse = reading.group[reading.weight[:, 1] > 0].flatten()
        unread = reading.share(len(grad)) == 0
        assert (grad[full] != 0).all() and (grad[coarse] != 0).all() and (grad[unread] == 0).all()
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
        seq = model._sequences(batch, model._encode(batch), True, None, "relevance", None, None)
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
    assert [reading.count for reading in out["readings"]] == [5, 5, 5]
    # the LM reads the level-of-detail allocation of the budget (no noise at evaluation)
    for r, reading in zip(out["relevance"], out["readings"]):
        expected = lod_allocation(r, (8, 8), 5, cfg.focus_vs_diversify)
        assert torch.equal(reading.anchor, expected.anchor) and torch.equal(reading.group, expected.group)


# --- the level-of-detail allocator on its own: a pure function of r, the grid, the budget, f and noise --------
def _levels(reading, grid):
    """Each region's level in a reading: 2 full (its tokens read one by one), 1 coarse (pooled into one read
    token), 0 unread. A one-token region read at either level looks full."""
    pooled = {int(a) for a, weight in zip(reading.anchor, reading.weight) if (weight > 0).sum() > 1}
    read = set(reading.group[reading.weight > 0].tolist())
    return [0 if int(m[0]) not in read else 1 if int(m[0]) in pooled else 2 for m in region_members(grid)]


def _spendable_for_every_ranking(grid, m):
    """Brute force: every ordering of the regions' sizes has some F full regions with P_F <= m <= P_F + R - F."""
    sizes = (region_members(grid) >= 0).sum(1).tolist()
    for order in set(itertools.permutations(sizes)):
        prefix = [sum(order[:f]) for f in range(len(order) + 1)]
        if not any(p <= m <= p + len(order) - f for f, p in enumerate(prefix)):
            return False
    return True


def test_lod_allocation_spends_exactly_the_budget_on_every_grid():
    rng = random.Random(0)
    torch.manual_seed(0)
    for h, w in itertools.product(range(1, 8), repeat=2):
        n, members = h * w, region_members((h, w))
        assert sorted(members[members >= 0].tolist()) == list(range(n))  # the regions tile the grid
        for k in range(1, n + 1):
            m = lod_count((h, w), k)
            if k <= n - 6 or k == n:
                assert m == k, (h, w, k)
            if members.shape[0] <= 6:  # the documented fallback: the largest count every ranking can spend
                assert m == max(c for c in range(1, k + 1) if _spendable_for_every_ranking((h, w), c)), (h, w, k)
            reading = lod_allocation(torch.rand(n), (h, w), k, rng.random(), torch.randn(members.shape[0]))
            assert reading.count == m
            torch.testing.assert_close(reading.weight.sum(1), torch.ones(m))  # each a mean of its tokens
            read = reading.group[reading.weight > 0].tolist()
            assert len(read) == len(set(read)), "no visual token is read twice"
            assert reading.anchor.tolist() == sorted(reading.anchor.tolist())  # raster order
            assert int(reading.full) + int(reading.coarse) == sum(level > 0 for level in _levels(reading, (h, w)))


def test_a_very_relevant_region_gets_full_detail_a_low_one_coarse_or_none():
    grid, members = (8, 8), region_members((8, 8))
    r = torch.full((64,), 0.3) + 0.01 * torch.rand(64, generator=torch.Generator().manual_seed(0))
    high, low = members[5], members[10]  # two interior regions
    r[high] = 0.95
    r[low] = 0.02
    for focus in (0.25, 0.5, 1.0):
        levels = _levels(lod_allocation(r, grid, 16, focus), grid)
        assert levels[5] == 2 and levels[10] == 0, (focus, levels)
    # f = 0: the budget goes to coverage: 16 regions, each one token; nothing is read at full detail
    assert _levels(lod_allocation(r, grid, 16, 0.0), grid) == [1] * 16
    # levels never rise as relevance falls (region relevance = mean r over its tokens)
    r = torch.rand(64, generator=torch.Generator().manual_seed(1))
    region_r = torch.stack([r[m].mean() for m in members])
    levels = torch.tensor(_levels(lod_allocation(r, grid, 20, 0.5), grid))
    assert (levels[region_r.argsort(descending=True)].diff() <= 0).all()


def test_focus_vs_diversify_trades_full_regions_for_coarse_ones():
    """Higher f: more of the budget at full detail, so fewer regions read; lower f: more regions, coarse."""
    r = torch.rand(16 * 12, generator=torch.Generator().manual_seed(2))
    splits = []
    for focus in (0.0, 0.25, 0.5, 0.75, 1.0):
        reading = lod_allocation(r, (16, 12), 24, focus)
        assert reading.count == 24
        splits.append((int(reading.full), int(reading.coarse)))
    fulls, coarses = [s[0] for s in splits], [s[1] for s in splits]
    regions = [f + c for f, c in splits]
    assert fulls == sorted(fulls) and coarses == sorted(coarses, reverse=True) and regions == sorted(regions)[::-1]
    assert splits[0] == (0, 24) and splits[-1] == (6, 0)  # all coarse at f = 0; 24 tokens = 6 full regions at 1
    # the share of the budget at full detail is f (to a whole region): 4 * full <= f * 24 < 4 * (full + 1)
    assert all(4 * f <= focus * 24 < 4 * (f + 1) for f, focus in zip(fulls, (0.0, 0.25, 0.5, 0.75, 1.0)))


def test_lod_allocation_needs_no_host_sync():
    """On the meta device any host sync (.item(), a data-dependent shape) raises: the allocation's shapes come
    from the grid and the budget alone, so a GPU step never waits for the allocator."""
    reading = lod_allocation(torch.rand(70, device="meta"), (7, 10), 20, 0.5, torch.rand(20, device="meta"))
    assert reading.anchor.device.type == "meta" and reading.count == 20


def test_a_batch_of_images_is_allocated_as_each_image_alone():
    """lod_allocations does a batch of images on one grid with one set of ops; image by image it gives the same
    readings (while training, with each image's own noise)."""
    r, noise = torch.rand(5, 64), torch.randn(5, 16)
    batched = lod_allocations(r, (8, 8), 20, 0.4, noise)
    for i in range(5):
        alone = lod_allocation(r[i], (8, 8), 20, 0.4, noise[i])
        for name in ("group", "weight", "anchor", "full", "coarse"):
            assert torch.equal(getattr(batched[i], name), getattr(alone, name)), name
    features = torch.randn(5, 64, 3)
    assert torch.allclose(batched.pool(features), torch.stack([batched[i].pool(features[i]) for i in range(5)]))
    assert torch.equal(batched.touched(64), torch.stack([batched[i].share(64) > 0 for i in range(5)]))


def test_an_eval_batch_runs_the_vision_tower_once(world):
    """evaluate_vqa's answers and answer loss read the same encoded batch: the vision tower, the costliest part of
    this model, runs once per eval batch, and the loss is the training forward's on the same readings."""
    cfg = cfg_for(world)
    torch.manual_seed(0)
    model = ArrCocVLM(cfg).eval()
    calls = []
    model.base.model.visual.register_forward_hook(lambda *_: calls.append(1))
    batch = VqaSource(cfg.eval_data, model.collate, cfg.max_bad_fraction).batch(range(4))
    answers, seq, loss = model.score(batch, "random", seed=7)
    assert len(calls) == 1 and len(answers) == 4
    with torch.no_grad():
        again = model(batch, selection="random", generator=torch.Generator().manual_seed(7))
    assert torch.equal(loss, again["lm_loss"])
    assert all(torch.equal(a.anchor, b.anchor) for a, b in zip(seq["readings"], again["readings"]))


def test_a_collated_batch_hands_few_tensors_to_the_loop(world):
    """Under DataLoader workers every tensor of a batch crosses to the training process as shared memory of its
    own (a file descriptor, a map, a cache entry each): the batch has one tensor per kind, not one per image."""
    cfg = cfg_for(world)
    model = ArrCocVLM(cfg)
    batch = VqaSource(cfg.train_data, model.collate, cfg.max_bad_fraction).batch(range(8))

    def tensors(value) -> int:
        if isinstance(value, torch.Tensor):
            return 1
        if isinstance(value, (list, tuple)):
            return sum(tensors(v) for v in value)
        return sum(tensors(v) for v in value.values()) if isinstance(value, dict) else 0

    assert {key: tensors(value) for key, value in batch.items() if tensors(value)} == {
        "pixel_values": 1, "image_grid_thw": 1, "input_ids": 1, "attention_mask": 1, "position_ids": 1,
        "texture_images": 1, "truth": 1}  # 64x64 scenes: one image size, one texture batch
    assert batch["truth"].shape == (8, 64) and all(batch["boxed"])


@pytest.mark.parametrize("family", FAMILIES)
def test_coarse_tokens_are_region_means_at_their_top_left_position(world, family):
    """All coarse (f = 0, 16 of 64): read token j is the mean of its region's four merged tokens (and deepstack
    features), at the M-RoPE position the full image gives the region's top-left token."""
    cfg = cfg_for(world, family, focus_vs_diversify=0.0)
    model = ArrCocVLM(cfg).eval()
    batch = VqaSource(cfg.eval_data, model.collate, cfg.max_bad_fraction).batch([0])
    with torch.no_grad():
        seq = model._sequences(batch, model._encode(batch), False, None, "relevance", None, None)
        vision = model.base.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"],
                                                     return_dict=True)
    members = region_members((8, 8))
    assert seq["readings"][0].count == 16 and int(seq["readings"][0].coarse) == 16
    pad = int((seq["attention_mask"][0] == 0).sum())
    read = slice(pad + 1, pad + 17)  # after vision_start
    torch.testing.assert_close(seq["inputs_embeds"][0, read], vision.pooler_output[0][members].mean(1))
    torch.testing.assert_close(seq["position_ids"][:, 0, read], batch["position_ids"][:, 0, 1 + members[:, 0]])
    deepstack = getattr(vision, "deepstack_features", None)
    if deepstack is not None:
        for layer, read_layer in zip(deepstack, seq["extra"]["deepstack_visual_embeds"]):
            torch.testing.assert_close(read_layer, layer[0][members].mean(1))


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
    assert_bf16_base_and_fp32_trainables(model)
    engine, optimizer, scheduler = build_optimization(model, cfg, World())
    batch = VqaSource(cfg.train_data, model.collate, cfg.max_bad_fraction).batch(range(4))
    noise = model.training_noise(batch, torch.Generator().manual_seed(0))
    assert noise.shape == (4, 16)  # one per 2x2 region of the 8x8 merged-token grid
    loss = train_step(engine, model, optimizer, scheduler, [batch], [noise], cfg)
    assert torch.isfinite(loss)
    assert_fp32_optimizer_state(optimizer)
    answers, _ = model.generate(batch)  # the greedy decoding under autocast
    assert len(answers) == 4


def _loss_backward(model, batch) -> None:
    model(batch)["loss"].backward()


def test_activation_checkpointing_recomputes_the_vlm_decoder_layers(world):
    """--activation-checkpointing on a Qwen-VL: its language model's decoder layers run again in the backward
    pass."""
    calls = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = ArrCocVLM(cfg_for(world, activation_checkpointing=checkpointing))
        model.train()
        batch = VqaSource(model.cfg.train_data, model.collate, model.cfg.max_bad_fraction).batch(range(4))
        calls.append(attention_runs_per_layer(model.base.model.language_model.layers, _loss_backward, model, batch))
    assert calls == [1.0, 2.0]


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


def test_training_reports_vqa_lines_and_resumes_exactly_after_sigterm(world, tmp_path):
    straight = tmp_path / "straight"
    result = _train(world, straight)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split("=")[0] for line in result.stdout.splitlines() if "=" in line]
    assert lines == ["vqa_accuracy", "relevance_score", "visual_tokens", "lod_full", "lod_coarse",
                     "eval_loss"] * 2  # steps 2 and 4
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
