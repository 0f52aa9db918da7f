"""Model pieces: data determinism, texture agreement, scorers, allocator, straight-through gate, LM paths."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer import data
from trainer.config import TrainConfig
from trainer.model import ArrCoc, allocate, budget_gamma, cells_selected
from trainer.texture import CHANNELS, cell_features, texture_cv2


def test_samples_regenerate_alone_and_streams_are_disjoint():
    a = data.generate(seed=3, start=0, count=6)
    b = data.generate(seed=3, start=4, count=2)
    for key in data.DATASET_KEYS:
        np.testing.assert_array_equal(a[key][4:], b[key])
    ev = data.generate(seed=3, start=0, count=6, offset=data.EVAL_OFFSET)
    assert not any((ev["images"][i] == a["images"][j]).all() for i in range(6) for j in range(6))


def test_ground_truth_marks_the_queried_object():
    d = data.generate(seed=0, start=0, count=64)
    assert d["relevance"].min() >= 0 and d["relevance"].max() <= 1
    assert (d["relevance"].sum(axis=(1, 2)) > 0).all()
    for image, query, rel in zip(d["images"], d["queries"], d["relevance"]):
        colour = np.array(data.PALETTE[data.VOCAB[query[1]]])
        exact = (image == colour).all(-1).reshape(8, 8, 8, 8).mean(axis=(1, 3))
        assert (exact >= rel - 1e-6).all()  # every relevant pixel has the queried colour


def test_opencv_and_torch_textures_agree():
    d = data.generate(seed=1, start=0, count=8)
    torch_cells = cell_features(torch.from_numpy(d["images"])).texture.permute(0, 2, 3, 1).numpy()
    cv_cells = np.stack([texture_cv2(im) for im in d["images"]])
    assert torch_cells.shape == cv_cells.shape == (8, 8, 8, len(CHANNELS))
    np.testing.assert_allclose(torch_cells, cv_cells, atol=3e-3)


def test_texture_is_per_image_not_batch_coupled():
    d = data.generate(seed=2, start=0, count=4)
    together = cell_features(torch.from_numpy(d["images"]))
    alone = cell_features(torch.from_numpy(d["images"][2:3]))
    torch.testing.assert_close(together.texture[2:3], alone.texture)
    torch.testing.assert_close(together.entropy[2:3], alone.entropy)


@pytest.mark.parametrize("focus", [0.0, 0.3, 1.0])
def test_allocator_budget_and_share(focus):
    cfg = TrainConfig(focus_vs_diversify=focus)
    r = torch.rand(5, 64, generator=torch.Generator().manual_seed(0))
    alloc = allocate(r, cfg)
    k = cells_selected(cfg)
    assert alloc.selected.shape == (5, k)
    assert torch.equal(alloc.selected.sort(-1).values, r.topk(k, -1).indices.sort(-1).values)
    total = k * (1 + cfg.max_tokens_per_cell) / 2
    torch.testing.assert_close(alloc.budget.sum(-1), torch.full((5,), total))
    torch.testing.assert_close(alloc.share.sum(-1), torch.ones(5))
    assert ((alloc.share > 0).sum(-1) == k).all()


def test_focus_trades_cells_for_steepness():
    lo, hi = TrainConfig(focus_vs_diversify=0.0), TrainConfig(focus_vs_diversify=1.0)
    assert cells_selected(lo) == lo.k_max and cells_selected(hi) == hi.k_min
    assert budget_gamma(lo) < budget_gamma(hi)


def test_gumbel_noise_changes_selection_only_in_training():
    cfg = TrainConfig()
    r = torch.rand(4, 64, generator=torch.Generator().manual_seed(1))
    noisy = allocate(r, cfg, noise=torch.randn(4, 64, generator=torch.Generator().manual_seed(2)) * 3)
    clean = allocate(r, cfg)
    assert not torch.equal(noisy.selected, clean.selected)


@pytest.fixture(scope="module")
def model_and_batch():
    torch.manual_seed(0)
    model = ArrCoc(TrainConfig())
    batch = {k: torch.from_numpy(v) for k, v in data.generate(0, 0, 8).items()}
    return model, batch


def test_gate_keeps_forward_and_lets_gradient_reach_the_scorer(model_and_batch):
    model, batch = model_and_batch
    model.zero_grad()
    out = model(batch)
    out["lm_loss"].backward()  # the LM loss alone: its only route into Q is the straight-through gate
    grad = model.participatory.query.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    again = model(batch)
    torch.testing.assert_close(out["loss"], again["loss"])


def test_base_lm_is_frozen_and_lora_is_trainable(model_and_batch):
    model, _ = model_and_batch
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any(n.startswith("participatory") for n in trainable)
    assert not any(n.startswith("lm.") and "lora_" not in n for n in trainable)
    lora_targets = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in trainable if "lora_A" in n}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= lora_targets


def test_tiny_lm_is_reproducible():
    a, b = ArrCoc(TrainConfig()), ArrCoc(TrainConfig())
    wa = a.lm.get_input_embeddings().weight
    torch.testing.assert_close(wa, b.lm.get_input_embeddings().weight)
