"""ARR-COC in front of a Qwen-VL: the adapter picks which of the VLM's own merged visual tokens its language model
reads, and at which level of detail (2x2 regions in full, coarse or not at all), each at its own M-RoPE position.

The walk from image and question to the LM's input, and the transformers code it follows: docs/vlm.md.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model

from .config import TrainConfig
from .errors import UserError
from .model import TrainableState, freeze_base, gumbel_noise
from .texture import CHANNELS, cell_features

VLM_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# LoRA on the language model's projections only; the vision tower's blocks (model.visual...) stay untouched.
LM_LINEAR = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROMPT = "{question} answer:"
SELECTIONS = ("relevance", "random", "uniform", "all")


class VlmError(UserError):
    """A --base-model folder that is not a loadable Qwen-VL checkpoint."""


def kept_count(cfg: TrainConfig, n: int, fraction: float | None = None) -> int:
    """The visual-token budget of an image of n tokens: --token-budget (else --token-fraction of n, or `fraction`
    when given, as the budget curve does), at least 1, at most n. The LM reads lod_count(grid, budget) tokens:
    the budget itself except within 6 tokens of n."""
    if fraction is not None:
        k = round(fraction * n)
    else:
        k = cfg.token_budget if cfg.token_budget > 0 else round(cfg.token_fraction * n)
    return int(min(n, max(1, k)))


# --- level of detail: regions of 2x2 merged tokens, each read at full detail, coarse (one token) or not at all --
REGION = 2  # a region is REGION x REGION merged tokens (smaller at the bottom and right edges of odd grids)


@functools.lru_cache(maxsize=256)
def region_members(grid: tuple[int, int]) -> torch.Tensor:
    """[R, 4] the raster indices of each region's tokens on an (h, w) merged-token grid, top-left first, -1
    padding the edge regions of odd grids; regions in raster order of their blocks. A function of the grid
    only, so it is built once per image size on the host."""
    h, w = grid
    by, bx, dy, dx = torch.meshgrid(torch.arange(-(-h // REGION)), torch.arange(-(-w // REGION)),
                                    torch.arange(REGION), torch.arange(REGION), indexing="ij")
    y, x = by * REGION + dy, bx * REGION + dx
    return torch.where((y < h) & (x < w), y * w + x, -1).reshape(-1, REGION * REGION)


@functools.lru_cache(maxsize=4096)
def lod_count(grid: tuple[int, int], k: int) -> int:
    """Visual tokens the LOD allocation reads for a budget of k on an (h, w) grid: k itself, except for a few
    budgets within 6 tokens of the whole image, which no mix of full (s tokens), coarse (1) and unread (0)
    regions spends exactly for every ranking of the regions: those read the largest count below k that every
    ranking spends exactly (61 of 64 for k = 62 or 63 on an 8x8 grid). A function of the grid and k only, so the
    sequence length is known on the host before relevance is computed (no device sync).

    Levels fall with rank (full regions, then coarse, then none), so a count m is spendable for a ranking iff
    some F full regions leave it within reach: P_F <= m <= P_F + (R - F), P_F the first F regions' tokens.
    For F <= R-3 those ranges join up from 0 (each region adds at most 4 <= R-F+1), so only the sizes of the
    three least relevant regions decide, and every ordered choice of them from the grid's sizes is tried."""
    sizes = (region_members(grid) >= 0).sum(1).tolist()
    n, regions = sum(sizes), len(sizes)
    tail = min(regions, 3)
    pool = [s for s in set(sizes) for _ in range(min(sizes.count(s), tail))]
    tails = set(itertools.permutations(pool, tail))

    def spendable(m: int, last: tuple[int, ...]) -> bool:
        for j in range(tail + 1):  # F = R - j full regions: the last j of the ranking are not full
            low = n - sum(last[tail - j:])
            if (0 if j == tail and regions > tail else low) <= m <= low + j:
                return True
        return False

    k = min(n, max(1, k))
    return next(m for m in range(k, 0, -1) if all(spendable(m, last) for last in tails))


@dataclass
class Reading:
    """What the LM reads of one image: m tokens, read token j the weighted sum of the visual tokens group[j]
    (weights weight[j]: one token with weight 1 at full detail, a region's tokens with equal weights when
    coarse), at the M-RoPE position of visual token anchor[j] (ascending: raster order). full / coarse: regions
    read at each level (0-d tensors; None for the token-level baselines)."""

    group: torch.Tensor  # [m, g] long
    weight: torch.Tensor  # [m, g] float
    anchor: torch.Tensor  # [m] long
    full: torch.Tensor | None = None
    coarse: torch.Tensor | None = None

    @classmethod
    def tokens(cls, selected: torch.Tensor) -> Reading:
        """Token-level: each selected visual token read as it is."""
        return cls(selected[:, None], torch.ones((len(selected), 1), device=selected.device), selected)

    @property
    def count(self) -> int:
        return self.anchor.shape[0]

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """[m, d] the read tokens of per-visual-token features [n, d]."""
        return (features[self.group] * self.weight[..., None].to(features.dtype)).sum(1)

    def share(self, n: int) -> torch.Tensor:
        """[n] the allocation distribution a over the visual tokens: each read token carries 1/m, spread equally
        over the tokens it pools (the model's relevance_score reads this)."""
        return torch.zeros(n, device=self.weight.device).index_add_(
            0, self.group.flatten(), (self.weight / self.count).flatten())


@dataclass
class Readings:
    """The Readings of a batch of images on one grid: Reading's fields with a leading batch dimension, so that
    pooling and the shares are one set of ops for the batch."""

    group: torch.Tensor  # [B, m, g] long
    weight: torch.Tensor  # [B, m, g] float
    anchor: torch.Tensor  # [B, m] long
    full: torch.Tensor | None = None  # [B]
    coarse: torch.Tensor | None = None  # [B]

    @classmethod
    def stack(cls, readings: list[Reading]) -> Readings:
        """The token-level baselines' per-image Readings (no levels), batched."""
        return cls(*(torch.stack([getattr(r, name) for r in readings]) for name in ("group", "weight", "anchor")))

    def __getitem__(self, i: int) -> Reading:
        return Reading(self.group[i], self.weight[i], self.anchor[i],
                       None if self.full is None else self.full[i], None if self.coarse is None else self.coarse[i])

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """[B, m, d] the read tokens of per-visual-token features [B, n, d]."""
        rows = torch.arange(len(features), device=features.device)[:, None, None]
        return (features[rows, self.group] * self.weight[..., None].to(features.dtype)).sum(2)

    def touched(self, n: int) -> torch.Tensor:
        """[B, n] whether the LM reads a visual token (at either level): its share in Reading.share is > 0."""
        share = torch.zeros((len(self.group), n), device=self.weight.device)
        return share.scatter_add_(1, self.group.flatten(1), self.weight.flatten(1)) > 0


@functools.lru_cache(maxsize=256)
def _region_tables(grid: tuple[int, int], device: torch.device) -> dict[str, torch.Tensor]:
    """What lod_allocation needs of a grid, built once per image size and device: the regions' members (padding
    pointing at token 0 with weight 0), sizes, and the candidate read tokens: every token at full detail (group
    itself, weight 1), then every region coarse (group its members, equal weights), each with its anchor."""
    members = region_members(grid).to(device)
    valid = members >= 0
    sizes = valid.sum(1)
    index = members.clamp_min(0)
    width = members.shape[1]
    one_hot = torch.zeros((members.numel(), width), device=device)
    one_hot[:, 0] = 1.0
    return {"index": index, "valid": valid, "sizes": sizes, "steps": torch.arange(len(sizes) + 1, device=device),
            "anchors": torch.cat([members.flatten(), members[:, 0]]),
            "group": torch.cat([index.reshape(-1, 1).expand(-1, width), index]),
            "weight": torch.cat([one_hot, valid / sizes[:, None]])}


def lod_allocation(r: torch.Tensor, grid: tuple[int, int], k: int, focus: float,
                   noise: torch.Tensor | None = None) -> Reading:
    """Spend a budget of k visual tokens over the 2x2 regions of an (h, w) grid by relevance r [h*w] (see
    lod_allocations, which does it for a batch of images on the same grid)."""
    return lod_allocations(r[None], grid, k, focus, None if noise is None else noise[None])[0]


def lod_allocations(r: torch.Tensor, grid: tuple[int, int], k: int, focus: float,
                    noise: torch.Tensor | None = None) -> Readings:
    """The Readings of the images of r [B, h*w], all on one (h, w) grid, spending a budget of k visual tokens.

    Regions are ranked by logit(mean r over the region) (+ noise [B, >= R], Gumbel while training). The top F
    regions are read at full detail (all their tokens, 4 inside the grid), the next C coarse (one token each),
    the rest not at all: P_F + C = lod_count(grid, k) tokens, P_F the full regions' tokens. focus
    (focus_vs_diversify) is the share of the budget spent at full detail: F is the most regions whose tokens fit
    in focus*k, raised where needed so that enough regions remain to spend the rest coarse. With 4-token regions
    that is the synthetic model's K(f) = round(K_max - f*(K_max - K_min)) for regions: from k regions all coarse
    at f = 0 down to k/4 all full at f = 1. Pure and sync-free: every shape follows from the grid and k (it runs
    on the meta device), and one set of ops serves the whole batch."""
    t = _region_tables(grid, r.device)
    index, valid, sizes, steps = t["index"], t["valid"], t["sizes"], t["steps"]
    regions, m = len(sizes), lod_count(grid, k)
    logits = torch.logit(((r.detach()[:, index] * valid).sum(-1) / sizes).clamp(1e-4, 1 - 1e-4))  # [B, R]
    if noise is not None:
        logits = logits + noise[:, :regions]
    order = logits.argsort(dim=-1, descending=True)
    # P_F: tokens of the first F regions at full detail, F = 0..R
    spent = torch.cat([sizes.new_zeros(len(r), 1), sizes[order].cumsum(-1)], dim=-1)
    by_share = (spent <= focus * m).sum(-1) - 1  # the most full regions the detail share affords (P_0 = 0)
    at_least = (spent + regions - steps < m).sum(-1)  # the fewest that leave enough regions to spend m coarse
    full_count = torch.maximum(by_share, at_least)
    coarse_count = m - spent.gather(-1, full_count[:, None])[:, 0]
    rank = torch.empty_like(order).scatter_(-1, order, steps[:-1].expand_as(order))
    full = rank < full_count[:, None]
    coarse = ~full & (rank < (full_count + coarse_count)[:, None])
    # Of the candidates, the m active ones in raster order of their anchors (unique: a region is read at one
    # level); inactive ones sort last. Shapes fixed by m.
    active = torch.cat([(full[:, :, None] & valid).flatten(1), coarse], dim=-1)
    pick = torch.where(active, t["anchors"], len(t["anchors"])).argsort(dim=-1)[:, :m]
    return Readings(t["group"][pick], t["weight"][pick], t["anchors"][pick], full.sum(-1), coarse.sum(-1))


def load_processors(path: str):
    """Tokenizer and image processor on their own: AutoProcessor would also build the video processor, which
    needs torchvision (not installable beside the CPU torch)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        return (AutoTokenizer.from_pretrained(path, local_files_only=True),
                AutoImageProcessor.from_pretrained(path, local_files_only=True))
    except (OSError, ValueError) as exc:
        raise VlmError(f"base_model={path}: cannot load its tokenizer and image processor ({exc})") from None


class VisualQueryScorer(nn.Module):
    """Q: each merged visual token (with its texture cell) against the question, cosine mapped to [0,1]."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.cells = nn.Sequential(nn.Linear(width + len(CHANNELS), hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.query = nn.Linear(width, hidden)
        self.scale = nn.Parameter(torch.tensor([5.0]))
        self.bias = nn.Parameter(torch.tensor([0.0]))

    def forward(self, cells: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """cells [B, n, width + 13], query [B, width] -> [B, n]."""
        cells, query = F.normalize(self.cells(cells), dim=-1), F.normalize(self.query(query), dim=-1)
        cosine = (cells @ query[..., None])[..., 0]
        return torch.sigmoid(self.scale * cosine + self.bias)


class VlmCollator:
    """Dict samples of trainer.vqa.VqaDataset -> one batch: pixel patches, grids, the full token sequences
    (every image placeholder present, right-padded), M-RoPE positions, each image's merged-token grid, the
    images at the processor's size for the texture arrays, and ground-truth relevance per image (truth [B, n_max],
    zero-padded, where boxed[i] says image i has boxes)."""

    def __init__(self, tokenizer, image_processor, config, rope_index):
        # rope_index: the base model's get_rope_index, a function of the ids and the config only. Run here, in a
        # DataLoader worker, its walk over the ids never syncs the training device.
        self.tokenizer, self.image_processor, self.rope_index = tokenizer, image_processor, rope_index
        self.image_token, self.start, self.end = (config.image_token_id, config.vision_start_token_id,
                                                  config.vision_end_token_id)
        self.eos = tokenizer.eos_token_id
        self.merge = image_processor.merge_size
        self.patch = image_processor.patch_size

    def __call__(self, samples: list[dict]) -> dict:
        import cv2

        processed = self.image_processor(images=[s["pixels"] for s in samples], return_tensors="pt")
        grid_thw = processed["image_grid_thw"]
        rows, truth, counts, grids = [], [], [], []
        texture_images = []
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, (sample, (t, h, w)) in enumerate(zip(samples, grid_thw.tolist())):
            gh, gw = h // self.merge, w // self.merge
            counts.append(t * gh * gw)
            grids.append((t * gh, gw))  # frames stacked by rows (an image is one frame)
            by_size.setdefault((h, w), []).append(i)
            truth.append(self._truth(sample, h * self.patch, w * self.patch, gh, gw))
        # The resized uint8 images, grouped by size: the model computes their texture arrays on its device, one
        # batched pass per image size the processor produced.
        for (h, w), members in by_size.items():
            height, width = h * self.patch, w * self.patch  # the size the processor resized these images to
            images = np.stack([cv2.resize(samples[i]["pixels"], (width, height), interpolation=cv2.INTER_AREA)
                               for i in members])
            texture_images.append((members, torch.from_numpy(images), (h // self.merge, w // self.merge)))
        for sample, n in zip(samples, counts):
            question = self.tokenizer(PROMPT.format(question=sample["question"]), add_special_tokens=False).input_ids
            target = Counter(sample["answers"]).most_common(1)[0][0]  # the annotators' majority answer
            answer = self.tokenizer(" " + target, add_special_tokens=False).input_ids + [self.eos]
            rows.append(([self.start] + [self.image_token] * n + [self.end] + question, answer))
        length = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((len(rows), length), self.eos, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (prompt, answer) in enumerate(rows):
            ids[i, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
            mask[i, :len(prompt) + len(answer)] = 1
        with torch.no_grad():
            positions, _ = self.rope_index(ids, mm_token_type_ids=(ids == self.image_token).int(),
                                           image_grid_thw=grid_thw, attention_mask=mask)
        return {"pixel_values": processed["pixel_values"], "image_grid_thw": grid_thw, "input_ids": ids,
                "attention_mask": mask, "position_ids": positions, "prompt_lengths": [len(p) for p, _ in rows],
                "answer_lengths": [len(a) for _, a in rows], "visual_counts": counts, "visual_grids": grids,
                "texture_images": texture_images, "answers": [s["answers"] for s in samples],
                # one tensor for the batch: a DataLoader worker hands each tensor over as shared memory of its own
                "boxed": [t is not None for t in truth], "truth": torch.nn.utils.rnn.pad_sequence(
                    [torch.zeros(n) if t is None else t for t, n in zip(truth, counts)], batch_first=True)}

    @staticmethod
    def _truth(sample: dict, height: int, width: int, gh: int, gw: int) -> torch.Tensor | None:
        """Share of each merged cell covered by the question's boxes (scaled to the resized image)."""
        if not sample["boxes"]:
            return None
        src_h, src_w = sample["pixels"].shape[:2]
        covered = np.zeros((height, width), np.float32)
        for x0, y0, x1, y1 in sample["boxes"]:
            covered[int(y0 * height / src_h):int(np.ceil(y1 * height / src_h)),
                    int(x0 * width / src_w):int(np.ceil(x1 * width / src_w))] = 1.0
        cells = covered.reshape(gh, height // gh, gw, width // gw).mean(axis=(1, 3))
        return torch.from_numpy(cells).flatten()


class ArrCocVLM(TrainableState, nn.Module):
    """The adapter around a frozen Qwen-VL with a LoRA on its language model."""

    base_name = "vlm"

    def __init__(self, cfg: TrainConfig, adapter_dir: Path | None = None):
        super().__init__()
        from transformers import AutoModelForImageTextToText

        self.cfg = cfg
        try:
            base = AutoModelForImageTextToText.from_pretrained(cfg.base_model, dtype=torch.float32,
                                                               local_files_only=True)
        except (OSError, ValueError) as exc:
            raise VlmError(f"base_model={cfg.base_model}: not a loadable Qwen-VL checkpoint folder ({exc})") from None
        freeze_base(base, cfg)
        if adapter_dir is None:
            lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=LM_LINEAR)
            self.vlm = get_peft_model(base, lora)
        else:
            self.vlm = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
        self.tokenizer, self.image_processor = load_processors(cfg.base_model)
        self.collate = VlmCollator(self.tokenizer, self.image_processor, base.config, base.model.get_rope_index)
        width = base.config.text_config.hidden_size
        self.participatory = VisualQueryScorer(width, cfg.scorer_hidden)

    @property
    def base(self) -> nn.Module:
        return self.vlm.get_base_model()

    @property
    def device(self) -> torch.device:
        return self.participatory.query.weight.device

    def training_noise(self, batch: dict, generator: torch.Generator | None) -> torch.Tensor | None:
        """Gumbel noise per region of one training batch (rows padded to its image with most regions), on the
        generator's device."""
        regions = [region_members(grid).shape[0] for grid in batch["visual_grids"]]
        shape = torch.Size((len(regions), max(regions)))
        return gumbel_noise(shape, self.cfg, generator, self.device)

    # --- the allocator ---------------------------------------------------------------------------------------
    def _read(self, r: torch.Tensor, grid: tuple[int, int], k: int, selection: str, noise: torch.Tensor | None,
              generator: torch.Generator | None) -> Readings:
        """What the LM reads of images on one grid (r [B, n]): ARR-COC's level-of-detail allocation of a budget of k;
        the baselines read as many whole tokens (random: one draw per image, in the batch's order)."""
        if selection == "relevance":
            return lod_allocations(r, grid, k, self.cfg.focus_vs_diversify, noise)
        n, k = r.shape[1], lod_count(grid, k)
        if selection == "all" or k >= n:
            picks = [torch.arange(n, device=r.device)] * len(r)
        elif selection == "uniform":  # strided: evenly spaced over the raster order
            picks = [torch.linspace(0, n - 1, k, device=r.device).round().long()] * len(r)
        else:
            picks = [torch.randperm(n, generator=generator)[:k].sort().values.to(r.device) for _ in range(len(r))]
        return Readings.stack([Reading.tokens(p) for p in picks])

    @torch.no_grad()
    def _encode(self, batch: dict) -> dict:
        """What does not depend on the allocation, computed once per batch (no grad: the base is frozen and the
        features are not trained): the vision tower's merged visual tokens (and Qwen3-VL's deepstack features),
        the text embeddings of the full sequences, their M-RoPE positions, and the texture, entropy and edge
        features [n, 13], [n], [n] of each image on its merged-token grid (fp32, bf16 autocast off)."""
        base, device = self.base, self.device
        vision = base.model.get_image_features(batch["pixel_values"].to(device), batch["image_grid_thw"].to(device),
                                               return_dict=True)
        text = base.get_input_embeddings()(batch["input_ids"].to(device, non_blocking=True))
        count = len(batch["visual_counts"])
        texture, entropy, edges = [None] * count, [None] * count, [None] * count
        with torch.autocast(device.type, enabled=False):
            for members, images, grid in batch["texture_images"]:
                feats = cell_features(images.to(device, non_blocking=True), grid)
                for j, i in enumerate(members):
                    texture[i] = feats.texture[j].flatten(1).t()
                    entropy[i] = feats.entropy[j].flatten()
                    edges[i] = feats.edges[j].flatten()
        return {"visual": [v.to(text.dtype) for v in vision.pooler_output], "text": text,
                "deepstack": getattr(vision, "deepstack_features", None),
                "positions": batch["position_ids"].to(device, non_blocking=True),
                "texture": texture, "entropy": entropy, "edges": edges}

    def _sequences(self, batch: dict, enc: dict, with_answer: bool, noise: torch.Tensor | None, selection: str,
                   fraction: float | None, generator: torch.Generator | None) -> dict:
        """The LM's input: per image [vision_start, the read tokens, vision_end, question(, answer)], left-padded,
        with each read token at its M-RoPE position. Images on the same grid (usually the whole batch) are scored,
        allocated and pooled together."""
        cfg, device, text, counts = self.cfg, self.device, enc["text"], batch["visual_counts"]
        c = cfg.compress_vs_particularize
        by_grid: dict[tuple[int, int], list[int]] = {}
        for i, grid in enumerate(batch["visual_grids"]):
            by_grid.setdefault(grid, []).append(i)
        relevance, readings, pooled, deep, aux_terms = {}, {}, {}, {}, {}
        for grid, members in by_grid.items():
            n = counts[members[0]]
            visual = torch.stack([enc["visual"][i] for i in members])  # [G, n, d]
            question = torch.stack([text[i, n + 2:batch["prompt_lengths"][i]].mean(0) for i in members])
            q = self.participatory(torch.cat([torch.stack([enc["texture"][i] for i in members]), visual], -1), question)
            p = torch.stack([enc["entropy"][i] for i in members])
            edges = torch.stack([enc["edges"][i] for i in members])
            r = c * (p + edges / edges.amax(-1, keepdim=True).clamp_min(1e-8)) / 2 + (1 - c) * q
            read = self._read(r, grid, kept_count(cfg, n, fraction), selection,
                              None if noise is None else noise[members], generator)
            gated = visual * (1 + r - r.detach())[..., None]  # straight-through gate, before pooling
            group_pooled = read.pool(gated)
            group_deep = [read.pool(torch.stack([layer[i] for i in members])) for layer in enc["deepstack"] or []]
            boxed = [j for j, i in enumerate(members) if batch["boxed"][i]]
            if boxed:  # on the tokens read (at either level) only, as feedback comes only from them
                touched = read.touched(n)[boxed].float()
                target = (batch["truth"][[members[j] for j in boxed], :n].to(device) > 0).float()
                bce = F.binary_cross_entropy(q[boxed].clamp(1e-6, 1 - 1e-6), target, reduction="none")
                aux_terms.update(zip((members[j] for j in boxed), (bce * touched).sum(-1) / touched.sum(-1)))
            for j, i in enumerate(members):
                relevance[i], readings[i], pooled[i] = r[j], read[j], group_pooled[j]
                deep[i] = [d[j] for d in group_deep]
        # left padding: every row ends at its last real token, where generation continues
        ends = [batch["prompt_lengths"][i] + (batch["answer_lengths"][i] if with_answer else 0)
                for i in range(len(counts))]
        lengths = [1 + readings[i].count + ends[i] - counts[i] - 1 for i in range(len(counts))]
        length, b, width = max(lengths), len(counts), text.shape[-1]
        inputs = text.new_zeros((b, length, width))
        position_ids = enc["positions"].new_zeros((3, b, length))
        mask = torch.zeros((b, length), dtype=torch.long, device=device)
        labels = torch.full((b, length), -100, dtype=torch.long, device=device)
        visual_mask = torch.zeros((b, length), dtype=torch.bool, device=device)
        for i, n in enumerate(counts):
            pad, m, end, full = length - lengths[i], readings[i].count, ends[i], enc["positions"][:, i]
            inputs[i, pad] = text[i, 0]
            inputs[i, pad + 1:pad + 1 + m] = pooled[i]
            inputs[i, pad + 1 + m:] = text[i, n + 1:end]
            position_ids[:, i, pad] = full[:, 0]
            position_ids[:, i, pad + 1:pad + 1 + m] = full[:, 1 + readings[i].anchor]
            position_ids[:, i, pad + 1 + m:] = full[:, n + 1:end]
            mask[i, pad:] = 1
            visual_mask[i, pad + 1:pad + 1 + m] = True
            if with_answer:
                start = batch["prompt_lengths"][i]
                answer = batch["input_ids"][i, start:start + batch["answer_lengths"][i]].to(device)
                labels[i, length - answer.shape[0]:] = answer
        extra = {}
        if enc["deepstack"] is not None:
            extra = {"visual_pos_masks": visual_mask, "deepstack_visual_embeds": [
                torch.cat([deep[i][j] for i in range(b)]) for j in range(len(enc["deepstack"]))]}
        aux = torch.stack([aux_terms[i] for i in sorted(aux_terms)]).mean() if aux_terms else inputs.new_zeros(())
        return {"inputs_embeds": inputs, "position_ids": position_ids, "attention_mask": mask, "labels": labels,
                "extra": extra, "relevance": [relevance[i] for i in range(b)],
                "readings": [readings[i] for i in range(b)], "aux": aux}

    # --- training and scoring --------------------------------------------------------------------------------
    def _autocast(self):
        """bf16 autocast for --precision bf16 (fp32 trainable weights, bf16 matmuls); nothing for fp32."""
        if self.cfg.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def forward(self, batch: dict, noise: torch.Tensor | None = None, selection: str = "relevance",
                fraction: float | None = None, generator: torch.Generator | None = None) -> dict:
        with self._autocast():
            seq = self._sequences(batch, self._encode(batch), True, noise, selection, fraction, generator)
            lm_loss = self._answer_loss(seq)
            loss = lm_loss + self.cfg.aux_weight * seq["aux"]
        visual_tokens = torch.tensor([float(reading.count) for reading in seq["readings"]]).mean()
        return {"loss": loss, "lm_loss": lm_loss, "aux_loss": seq["aux"], "visual_tokens": visual_tokens,
                "relevance": seq["relevance"], "readings": seq["readings"]}

    def _answer_loss(self, seq: dict) -> torch.Tensor:
        hidden = self.base.model.language_model(inputs_embeds=seq["inputs_embeds"], position_ids=seq["position_ids"],
                                                attention_mask=seq["attention_mask"], **seq["extra"]).last_hidden_state
        logits = self.base.lm_head(hidden[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), seq["labels"][:, 1:].flatten(), ignore_index=-100)

    @contextlib.contextmanager
    def _gathered(self):
        """Outside the root module's forward, a fully_shard'ed model (FSDP2) must gather the root's own weights
        itself; the decoder layers and vision blocks gather theirs in their own forwards. Nothing otherwise."""
        unshard = hasattr(self, "unshard")  # torch.distributed.fsdp.FSDPModule
        if unshard:
            self.unshard()
        try:
            with self._autocast():
                yield
        finally:
            if unshard:
                self.reshard()

    @torch.no_grad()
    def generate(self, batch: dict, selection: str = "relevance", fraction: float | None = None,
                 generator: torch.Generator | None = None) -> tuple[list[str], dict]:
        """Greedy answers (a KV cache, positions continuing after each row's last one) and what the LM read."""
        with self._gathered():
            seq = self._sequences(batch, self._encode(batch), False, None, selection, fraction, generator)
            return self._greedy(seq), seq

    @torch.no_grad()
    def score(self, batch: dict, selection: str = "relevance", fraction: float | None = None,
              seed: int = 0) -> tuple[list[str], dict, torch.Tensor]:
        """An evaluation batch: the greedy answers, what the LM read, and the answer loss (on the annotators'
        majority answer), with the vision tower run once for both. Random selection draws from a generator seeded
        by `seed`, the same draw for the answers and the loss."""
        with self._gathered():
            enc = self._encode(batch)
            seq = self._sequences(batch, enc, False, None, selection, fraction, torch.Generator().manual_seed(seed))
            answers = self._greedy(seq)
            scored = self._sequences(batch, enc, True, None, selection, fraction, torch.Generator().manual_seed(seed))
            return answers, seq, self._answer_loss(scored)

    def _greedy(self, seq: dict) -> list[str]:
        lm, head, embed = self.base.model.language_model, self.base.lm_head, self.base.get_input_embeddings()
        out = lm(inputs_embeds=seq["inputs_embeds"], position_ids=seq["position_ids"],
                 attention_mask=seq["attention_mask"], use_cache=True, **seq["extra"])
        mask = seq["attention_mask"]
        next_position = seq["position_ids"].amax(dim=(0, 2)) + 1
        generated = []
        for _ in range(self.cfg.max_answer_tokens):
            token = head(out.last_hidden_state[:, -1]).argmax(-1)
            generated.append(token)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            position = next_position.view(1, -1, 1).expand(3, -1, 1)
            next_position = next_position + 1
            out = lm(inputs_embeds=embed(token)[:, None], position_ids=position, attention_mask=mask,
                     past_key_values=out.past_key_values, use_cache=True)
        tokens = torch.stack(generated, dim=1).cpu().tolist()  # one host transfer per batch
        eos = self.tokenizer.eos_token_id
        answers = [self.tokenizer.decode(row[:row.index(eos)] if eos in row else row, skip_special_tokens=True)
                   for row in tokens]
        return [a.strip() for a in answers]
