"""The trainer as a GPU run uses it, tested on the CPU: device placement (the meta device stands in for a GPU:
any tensor made on the host and mixed in raises), bf16, gradient accumulation, FSDP2, the input pipeline, the
corrupt-checkpoint fallback, TensorBoard curves and the flags' bad values."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from trainer_helpers import (
    FAST,
    REPO,
    assert_bf16_base_and_fp32_trainables,
    assert_fp32_optimizer_state,
    attention_runs_per_layer,
    clean_env,
    free_port,
    read_metrics,
    run_trainer,
    trainer_cmd,
)

from trainer import data
from trainer.config import TrainConfig
from trainer.data import SceneDataset, SceneSource, ShardSampler
from trainer.distributed import World
from trainer.model import ArrCoc
from trainer.scene_task import batch_sums
from trainer.train import build_optimization, lr_lambda, train_step


def test_the_meta_device_rejects_host_tensors():
    """What makes the next test meaningful: a host tensor mixed into a meta computation raises."""
    with pytest.raises(RuntimeError):
        torch.zeros(4, device="meta") + torch.ones(4)


def test_a_training_step_and_an_eval_batch_run_entirely_on_another_device():
    cfg = TrainConfig(batch_size=4, grad_accum=2)
    torch.manual_seed(0)
    model = ArrCoc(cfg).to("meta")
    world = World(device=torch.device("meta"))
    engine, optimizer, scheduler = build_optimization(model, cfg, world)
    host = data.generate(0, 0, 4)
    batches = [{k: torch.from_numpy(v).to("meta") for k, v in host.items()} for _ in range(cfg.grad_accum)]
    noises = [model.training_noise(b, None) for b in batches]  # texture, scorers, noise, allocator
    assert all(n.device.type == "meta" for n in noises)
    loss = train_step(engine, model, optimizer, scheduler, batches, noises, cfg)  # LoRA LM, loss, backward, AdamW
    assert loss.device.type == "meta"
    model.eval()
    with torch.no_grad():
        sums = batch_sums(model(batches[0]), batches[0])  # evaluation
    assert sums.device.type == "meta" and sums.shape == (4,)
    state = model.trainable_state()  # what checkpoints and adapters hold
    assert state and all(t.device.type == "meta" for t in state.values())
    moments = [t for s in optimizer.state_dict()["state"].values() for k, t in s.items() if k != "step"]
    assert moments and all(t.device.type == "meta" for t in moments)


def test_bf16_keeps_the_base_in_bf16_and_every_trainable_weight_and_optimizer_state_in_fp32():
    cfg = TrainConfig(batch_size=4, precision="bf16")
    torch.manual_seed(0)
    model = ArrCoc(cfg)
    assert_bf16_base_and_fp32_trainables(model)
    engine, optimizer, scheduler = build_optimization(model, cfg, World())
    batch = {k: torch.from_numpy(v) for k, v in data.generate(0, 0, 4).items()}
    loss = train_step(engine, model, optimizer, scheduler, [batch], [model.training_noise(batch, None)], cfg)
    assert torch.isfinite(loss)
    assert_fp32_optimizer_state(optimizer)


def test_grad_accumulation_matches_one_large_batch():
    """Two micro-batches of 4 take the same optimizer step as one batch of 8 (fp32, no noise)."""
    host = data.generate(0, 0, 8)
    finals = []
    for accum, size in ((1, 8), (2, 4)):
        cfg = TrainConfig(batch_size=size, grad_accum=accum, exploit_vs_explore=1.0)
        torch.manual_seed(0)
        model = ArrCoc(cfg)
        engine, optimizer, scheduler = build_optimization(model, cfg, World())
        batches = [{k: torch.from_numpy(v[i * size:(i + 1) * size]) for k, v in host.items()} for i in range(accum)]
        train_step(engine, model, optimizer, scheduler, batches, [None] * accum, cfg)
        finals.append(model.trainable_state())
    for name, value in finals[0].items():
        torch.testing.assert_close(finals[1][name], value, rtol=1e-4, atol=1e-5)


def test_activation_checkpointing_recomputes_the_decoder_layers_and_takes_the_same_step():
    """--activation-checkpointing: each decoder layer of the base LM runs again in the backward pass (its
    activations were not kept), and the optimizer step is the one taken without it (fp32, no noise)."""
    host = data.generate(0, 0, 4)
    batch = {k: torch.from_numpy(v) for k, v in host.items()}
    finals, calls = [], []
    for checkpointing in (False, True):
        cfg = TrainConfig(batch_size=4, exploit_vs_explore=1.0, activation_checkpointing=checkpointing)
        torch.manual_seed(0)
        model = ArrCoc(cfg)
        model.train()
        engine, optimizer, scheduler = build_optimization(model, cfg, World())
        calls.append(attention_runs_per_layer(model.base.model.layers, train_step, engine, model, optimizer,
                                              scheduler, [batch], [None], cfg))
        finals.append(model.trainable_state())
    assert calls == [1.0, 2.0]
    for name, value in finals[0].items():
        torch.testing.assert_close(finals[1][name], value, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compile_gives_the_metrics_of_the_eager_run(tmp_path):
    """--compile (torch.compile of the model's forward, inductor): same evaluation as the eager run. Slow: the
    first compile takes minutes on 2 CPU cores."""
    args = ["--steps", "4", "--batch-size", "8", "--eval-size", "32", "--eval-every", "4", "--checkpoint-every", "4",
            "--num-workers", "0"]
    metrics = []
    for extra, name in (([], "eager"), (["--compile"], "compiled")):
        out = tmp_path / name
        done = run_trainer(*args, *extra, "--out", str(out), timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
        metrics.append(read_metrics(out))
    for key in ("relevance_score", "eval_loss", "recall_at_k", "answer_accuracy"):
        assert metrics[1][key] == pytest.approx(metrics[0][key], rel=1e-4, abs=1e-6), key


def test_the_sampler_shuffles_per_epoch_shards_ranks_and_resumes_mid_epoch():
    dataset = list(range(10))
    take = lambda sampler, n: [next(it) for it in [iter(sampler)] for _ in range(n)]  # noqa: E731
    ranks = [take(ShardSampler(dataset, 2, r, seed=3), 5) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == dataset  # one epoch: the two shards cover it once
    two_epochs = take(ShardSampler(dataset, 2, 0, seed=3), 10)
    assert sorted(two_epochs[:5]) != two_epochs[:5] or two_epochs[:5] != two_epochs[5:]  # reshuffled per epoch
    assert take(ShardSampler(dataset, 2, 0, seed=3, skip=7), 3) == two_epochs[7:10]  # resume mid-epoch
    assert take(ShardSampler(dataset, 2, 0, seed=4), 5) != ranks[0]


def test_the_loaders_workers_stop_when_the_block_ends_even_while_the_iterator_is_still_referenced():
    """Workers ignore SIGTERM (quiet_worker), so workers of an iterator still alive at interpreter exit kept
    multiprocessing's exit handler waiting forever (seen as a hung two-process FSDP run): the block stops them."""
    import multiprocessing

    loader = torch.utils.data.DataLoader(list(range(64)), batch_size=4, num_workers=2, worker_init_fn=data.quiet_worker,
                                         persistent_workers=True)
    with data.loader_batches(loader) as batches:
        assert next(batches).tolist() == [0, 1, 2, 3]
        assert len(multiprocessing.active_children()) == 2
    assert batches is not None and multiprocessing.active_children() == []


def test_scenes_follow_image_size_and_grid():
    cfg = TrainConfig(image_size=32, grid=4, k_max=8, k_min=2, batch_size=2)
    sample = SceneDataset(SceneSource(0, 0, "", cfg.image_size, cfg.grid))[0]
    assert sample["images"].shape == (32, 32, 3) and sample["relevance"].shape == (4, 4)
    torch.manual_seed(0)
    model = ArrCoc(cfg)
    batch = {k: torch.from_numpy(v) for k, v in data.generate(0, 0, 2, image_size=32, grid=4).items()}
    assert model(batch)["share"].shape == (2, 16)


def test_a_prepared_dataset_of_another_grid_is_refused(tmp_path):
    data.save_dataset(tmp_path / "d", data.generate(0, 0, 4), {})
    result = run_trainer("--train-data", str(tmp_path / "d"), "--grid", "4", "--k-max", "8",
                         "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "grid=4" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value, names", [
    ("--grad-accum", "0", "grad_accum"),
    ("--precision", "fp16x", "fp32, bf16"),
    ("--num-workers", "-1", "num_workers"),
    ("--dist-timeout", "0", "dist_timeout"),
    ("--strategy", "zero9", "ddp, deepspeed, fsdp"),
])
def test_bad_gpu_flags_exit_2_with_one_line_and_write_nothing(tmp_path, flag, value, names):
    out = tmp_path / "out"
    result = run_trainer(flag, value, "--out", str(out), timeout=60)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and names in result.stderr
    assert not out.exists()


def test_a_missing_train_data_leaves_out_untouched(tmp_path):
    out = tmp_path / "out"
    result = run_trainer("--train-data", str(tmp_path / "nowhere"), "--out", str(out))
    assert result.returncode == 2 and "nowhere" in result.stderr
    assert not out.exists()


def _interrupt_and_resume(tmp_path, args, replicas: int = 1) -> tuple[dict, dict, str]:
    """(uninterrupted metrics, interrupted-then-resumed metrics, the resumed run's stderr)."""
    def launch(out):
        port = str(free_port())
        envs = [clean_env() if replicas == 1 else clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                                              WORLD_SIZE=str(replicas), RANK=str(r))
                for r in range(replicas)]
        return [subprocess.Popen(trainer_cmd(*args, "--out", str(out)), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for env in envs]

    def finish(procs):
        outs = [p.communicate(timeout=400) for p in procs]
        return [p.returncode for p in procs], outs

    codes, outs = finish(launch(tmp_path / "straight"))
    assert codes == [0] * replicas, outs[0][1][-3000:]
    procs = launch(tmp_path / "interrupted")
    for line in procs[0].stdout:  # the first evaluation is printed: we are midway
        if line.startswith("eval_loss="):
            break
    procs[0].send_signal(signal.SIGTERM)
    codes, outs = finish(procs)
    assert codes[0] == 128 + signal.SIGTERM, outs[0][1][-3000:]
    codes, outs = finish(launch(tmp_path / "interrupted"))
    assert codes == [0] * replicas, outs[0][1][-3000:]
    return read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "interrupted"), outs[0][1]


def test_bf16_with_accumulation_resumes_exactly(tmp_path):
    args = ["--steps", "30", *FAST, "--precision", "bf16", "--grad-accum", "2", "--batch-size", "8",
            "--num-workers", "1", "--log-every", "5"]
    straight, resumed, err = _interrupt_and_resume(tmp_path, args)
    assert "resumed from" in err and "effective batch: 8 per micro-batch x 2 accumulation x 1 replicas = 16" in err
    assert resumed == straight
    assert [p["step"] for p in straight["loss_curve"]] == [5, 10, 15, 20, 25, 30]


def test_fsdp_with_two_gloo_processes_resumes_exactly_and_reshards(tmp_path):
    args = ["--steps", "20", *FAST, "--strategy", "fsdp", "--batch-size", "8", "--num-workers", "0"]
    straight, resumed, err = _interrupt_and_resume(tmp_path, args, replicas=2)
    assert "resumed from" in err
    assert resumed == straight
    assert (tmp_path / "straight" / "adapter" / "adapter_model.safetensors").is_file()
    # the same checkpoints, read by a job of one replica: torch.distributed.checkpoint reshards them
    result = run_trainer(*args[:1], "30", *args[2:], "--out", str(tmp_path / "straight"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr and read_metrics(tmp_path / "straight")["step"] == 30


def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    out = tmp_path / "run"
    args = ["--steps", "20", *FAST, "--batch-size", "8", "--num-workers", "0"]
    assert run_trainer(*args, "--out", str(out)).returncode == 0
    newest = out / "checkpoints" / "step-00000020" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # what a preempted non-HNS bucket can leave under COMPLETE
    result = run_trainer(*args[:1], "30", *args[2:], "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step-00000020" in result.stderr and "cannot be loaded" in result.stderr
    assert "resumed from" in result.stderr and "at step 10" in result.stderr
    assert read_metrics(out)["checkpoints_skipped"] == 1


def test_tensorboard_curves_hold_loss_lr_rate_every_metric_and_pictures(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = run_trainer("--steps", "10", *FAST, "--batch-size", "8", "--log-every", "5", "--num-workers", "0",
                         "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/samples_per_s", "eval/relevance_score", "eval/recall_at_k",
            "eval/answer_accuracy", "eval/eval_loss"} <= scalars
    assert [e.step for e in events.Scalars("train/loss")] == [5, 10]
    assert "eval/allocation" in events.Tags()["images"]
    assert json.loads((out / "metrics.json").read_text())["loss_curve"][-1]["step"] == 10


def test_lr_schedule_is_per_optimizer_step():
    cfg = TrainConfig(steps=100, warmup_steps=10, grad_accum=4)
    assert np.isclose(lr_lambda(cfg)(9), 1.0)


def test_the_gpu_benchmark_runs_its_cpu_path_and_says_so(tmp_path):
    result = subprocess.run([sys.executable, "bench/gpu_step.py", "--json", str(tmp_path / "f.json")], cwd=REPO,
                            env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not GPU figures" in result.stdout
    figures = json.loads((tmp_path / "f.json").read_text())
    assert figures["gpu"] is False and figures["samples_per_s"] > 0 and figures["flops_per_token"] > 0


def test_the_pipeline_report_draws_the_runs_loss_and_eval_curves(tmp_path):
    from pipelines.kfp_pipeline.report import html_report, load_curves

    out = tmp_path / "run"
    result = run_trainer("--steps", "10", *FAST, "--batch-size", "8", "--log-every", "5", "--eval-every", "5",
                         "--num-workers", "0", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    curves = load_curves(out / "adapter")
    assert [p["step"] for p in curves["loss"]] == [5, 10] and [e["step"] for e in curves["eval"]] == [5, 10]
    metrics = {k: v for k, v in curves["eval"][-1].items() if k != "step"}
    page = html_report(metrics, metrics, {}, {}, [], [], curves)
    assert "Training curves" in page and page.count("<svg") == 1 and "data:image/png" not in page
    assert "Training curves" not in html_report(metrics, metrics, {}, {}, [], [], load_curves(tmp_path))


def test_every_rank_runs_the_same_number_of_eval_forwards_when_the_eval_set_does_not_split_evenly():
    """5 eval samples, batch 1, 2 ranks: rank 1 has 2 samples but must run 3 forwards (each is a collective under
    FSDP); its third batch is a stand-in with weight 0, so every sample is counted exactly once."""
    from trainer.distributed import shard
    from trainer.scene_task import batches_per_rank, eval_source, load_eval_batches

    cfg = TrainConfig(eval_size=5, batch_size=1).validate()
    counted = []
    for rank in (0, 1):
        world = World(rank=rank, world_size=2)
        entries = load_eval_batches(eval_source(cfg), shard(cfg.eval_size, world), batches_per_rank(cfg, world), 0)
        assert len(entries) == 3
        counted += [int(i) for indices, _, weight in entries if weight for i in indices]
    assert sorted(counted) == [0, 1, 2, 3, 4]
