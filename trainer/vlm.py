"""ARR-COC in front of a Qwen-VL: the adapter picks which of the VLM's own merged visual tokens its LM reads.

Per image and question:
  frozen vision tower -> merged visual tokens on an (h, w) grid (get_image_features)
  texture array / entropy / Sobel salience on the same grid -> P, S; Q from the visual tokens and the question
  -> r = c*(P+S)/2 + (1-c)*Q -> keep K of the n tokens (Gumbel-top-K while training): relevant regions keep
     all their tokens, others few or none; K = --token-budget, or --token-fraction of n
  -> kept tokens times the straight-through gate 1 + r - stopgrad(r), at their original 3D M-RoPE positions
  -> LoRA'd language model reads [vision_start, kept tokens, vision_end, question, answer].

Positions come from the model's own get_rope_index over the full sequence (every image placeholder), and the
dropped tokens' columns are removed: the LM sees each kept token where the full image would have put it
(transformers models/qwen2_vl/modeling_qwen2_vl.py Qwen2VLModel.get_rope_index; the text model takes
inputs_embeds and 3-row position_ids). Qwen3-VL's deepstack features are gathered the same way and passed as
visual_pos_masks / deepstack_visual_embeds (models/qwen3_vl/modeling_qwen3_vl.py Qwen3VLTextModel.forward).
"""
from __future__ import annotations

import contextlib
import json
from collections import Counter
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


def vlm_type(path: str) -> str | None:
    """The Qwen-VL model_type of a checkpoint folder, or None when it is not one (the synthetic path)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return model_type if model_type in VLM_TYPES else None


def kept_count(cfg: TrainConfig, n: int, fraction: float | None = None) -> int:
    """Visual tokens the LM reads out of n: --token-budget (else --token-fraction of n, or `fraction` when
    given, as the budget curve does), at least 1, at most n."""
    if fraction is not None:
        k = round(fraction * n)
    else:
        k = cfg.token_budget if cfg.token_budget > 0 else round(cfg.token_fraction * n)
    return int(min(n, max(1, k)))


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
        cosine = F.normalize(self.cells(cells), dim=-1) @ F.normalize(self.query(query), dim=-1)
        return torch.sigmoid(self.scale * cosine + self.bias)


class VlmCollator:
    """Dict samples of trainer.vqa.VqaDataset -> one batch: pixel patches, grids, the full token sequences
    (every image placeholder present, right-padded), M-RoPE positions, the images at the processor's size for
    the texture arrays, and ground-truth relevance per image."""

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
        rows, truth, counts = [], [], []
        texture_images = []
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, (sample, (t, h, w)) in enumerate(zip(samples, grid_thw.tolist())):
            gh, gw = h // self.merge, w // self.merge
            counts.append(t * gh * gw)
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
                "answer_lengths": [len(a) for _, a in rows], "visual_counts": counts,
                "texture_images": texture_images, "truth": truth, "answers": [s["answers"] for s in samples]}

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
        """Gumbel noise per visual token of one training batch (rows padded to its longest image), on the
        generator's device."""
        shape = torch.Size((len(batch["visual_counts"]), max(batch["visual_counts"])))
        return gumbel_noise(shape, self.cfg, generator, self.device)

    # --- the allocator ---------------------------------------------------------------------------------------
    def _select(self, r: torch.Tensor, k: int, selection: str, noise: torch.Tensor | None,
                generator: torch.Generator | None) -> torch.Tensor:
        n = r.shape[0]
        if selection == "all" or k >= n:
            return torch.arange(n, device=r.device)
        if selection == "uniform":  # strided: evenly spaced over the raster order
            return torch.linspace(0, n - 1, k, device=r.device).round().long()
        if selection == "random":
            return torch.randperm(n, generator=generator)[:k].sort().values.to(r.device)
        logits = torch.logit(r.detach().clamp(1e-4, 1 - 1e-4))
        if noise is not None:
            logits = logits + noise
        return logits.topk(k).indices.sort().values

    def _cell_features(self, batch: dict) -> tuple[list, list, list]:
        """Texture [n,13], entropy [n] and edge [n] per image on the merged-token grid, computed batched on the
        model's device in fp32 (bf16 autocast off: the features are not trained)."""
        count = len(batch["visual_counts"])
        texture, entropy, edges = [None] * count, [None] * count, [None] * count
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            for members, images, grid in batch["texture_images"]:
                feats = cell_features(images.to(self.device, non_blocking=True), grid)
                for j, i in enumerate(members):
                    texture[i] = feats.texture[j].flatten(1).t()
                    entropy[i] = feats.entropy[j].flatten()
                    edges[i] = feats.edges[j].flatten()
        return texture, entropy, edges

    def _sequences(self, batch: dict, with_answer: bool, noise: torch.Tensor | None, selection: str,
                   fraction: float | None, generator: torch.Generator | None) -> dict:
        cfg, base, device = self.cfg, self.base, self.device
        embed = base.get_input_embeddings()
        full_positions = batch["position_ids"].to(device, non_blocking=True)  # M-RoPE of the full sequence
        ids = batch["input_ids"].to(device, non_blocking=True)
        with torch.no_grad():
            vision = base.model.get_image_features(batch["pixel_values"].to(device), batch["image_grid_thw"].to(device),
                                                   return_dict=True)
            text_embeds = embed(ids)
        deepstack = getattr(vision, "deepstack_features", None)
        texture, entropy, edges = self._cell_features(batch)
        c = cfg.compress_vs_particularize
        rows, positions, kept_deep, relevance, selected, aux_terms = [], [], [], [], [], []
        for i, n in enumerate(batch["visual_counts"]):
            prompt_len = batch["prompt_lengths"][i]
            end = prompt_len + (batch["answer_lengths"][i] if with_answer else 0)
            visual = vision.pooler_output[i].to(text_embeds.dtype)
            question = text_embeds[i, n + 2:prompt_len].mean(0)
            cells = torch.cat([texture[i], visual], dim=-1)
            q = self.participatory(cells, question)
            p = entropy[i]
            s = edges[i] / edges[i].max().clamp_min(1e-8)
            r = c * (p + s) / 2 + (1 - c) * q
            k = kept_count(cfg, n, fraction)
            sel = self._select(r, k, selection, None if noise is None else noise[i, :n], generator)
            r_sel = r.gather(0, sel)
            tokens = visual[sel] * (1 + r_sel - r_sel.detach())[:, None]  # straight-through gate
            rows.append(torch.cat([text_embeds[i, :1], tokens, text_embeds[i, n + 1:end]]))
            keep = torch.cat([torch.zeros(1, dtype=torch.long, device=device), 1 + sel,
                              torch.arange(n + 1, end, device=device)])
            positions.append(full_positions[:, i, keep])
            if deepstack is not None:
                kept_deep.append([layer[i][sel] for layer in deepstack])
            relevance.append(r)
            selected.append(sel)
            truth = batch["truth"][i]
            if truth is not None:
                target = (truth.to(device).gather(0, sel) > 0).float()
                aux_terms.append(F.binary_cross_entropy(q.gather(0, sel).clamp(1e-6, 1 - 1e-6), target))
        # left padding: every row ends at its last real token, where generation continues
        length = max(row.shape[0] for row in rows)
        b, width = len(rows), text_embeds.shape[-1]
        inputs = text_embeds.new_zeros((b, length, width))
        position_ids = full_positions.new_zeros((3, b, length))
        mask = torch.zeros((b, length), dtype=torch.long, device=device)
        labels = torch.full((b, length), -100, dtype=torch.long, device=device)
        visual_mask = torch.zeros((b, length), dtype=torch.bool, device=device)
        for i, row in enumerate(rows):
            pad = length - row.shape[0]
            inputs[i, pad:] = row
            position_ids[:, i, pad:] = positions[i]
            mask[i, pad:] = 1
            k = selected[i].shape[0]
            visual_mask[i, pad + 1:pad + 1 + k] = True
            if with_answer:
                n, start = batch["visual_counts"][i], batch["prompt_lengths"][i]
                answer = batch["input_ids"][i, start:start + batch["answer_lengths"][i]].to(device)
                labels[i, length - answer.shape[0]:] = answer
        extra = {}
        if deepstack is not None:
            extra = {"visual_pos_masks": visual_mask,
                     "deepstack_visual_embeds": [torch.cat([d[j] for d in kept_deep]) for j in range(len(deepstack))]}
        aux = torch.stack(aux_terms).mean() if aux_terms else inputs.new_zeros(())
        return {"inputs_embeds": inputs, "position_ids": position_ids, "attention_mask": mask, "labels": labels,
                "extra": extra, "relevance": relevance, "selected": selected, "aux": aux}

    # --- training and scoring --------------------------------------------------------------------------------
    def _autocast(self):
        """bf16 autocast for --precision bf16 (fp32 trainable weights, bf16 matmuls); nothing for fp32."""
        if self.cfg.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def forward(self, batch: dict, noise: torch.Tensor | None = None, selection: str = "relevance",
                fraction: float | None = None, generator: torch.Generator | None = None) -> dict:
        with self._autocast():
            return self._forward(batch, noise, selection, fraction, generator)

    def _forward(self, batch: dict, noise, selection: str, fraction: float | None, generator) -> dict:
        seq = self._sequences(batch, True, noise, selection, fraction, generator)
        hidden = self.base.model.language_model(inputs_embeds=seq["inputs_embeds"], position_ids=seq["position_ids"],
                                                attention_mask=seq["attention_mask"], **seq["extra"]).last_hidden_state
        logits = self.base.lm_head(hidden[:, :-1])
        lm_loss = F.cross_entropy(logits.flatten(0, 1).float(), seq["labels"][:, 1:].flatten(), ignore_index=-100)
        loss = lm_loss + self.cfg.aux_weight * seq["aux"]
        visual_tokens = torch.tensor([float(s.shape[0]) for s in seq["selected"]]).mean()
        return {"loss": loss, "lm_loss": lm_loss, "aux_loss": seq["aux"], "visual_tokens": visual_tokens,
                "relevance": seq["relevance"], "selected": seq["selected"]}

    @torch.no_grad()
    def generate(self, batch: dict, selection: str = "relevance", fraction: float | None = None,
                 generator: torch.Generator | None = None) -> tuple[list[str], dict]:
        """Greedy answers (a KV cache, positions continuing after each row's last one) and the selection used.
        Under FSDP2 this is not the root module's forward, so the root's own weights are gathered around it (the
        decoder layers and vision blocks gather theirs in their own forwards)."""
        unshard = hasattr(self, "unshard")  # a fully_shard'ed model (torch.distributed.fsdp.FSDPModule)
        if unshard:
            self.unshard()
        try:
            with self._autocast():
                return self._generate(batch, selection, fraction, generator)
        finally:
            if unshard:
                self.reshard()

    def _generate(self, batch: dict, selection: str, fraction: float | None, generator) -> tuple[list[str], dict]:
        seq = self._sequences(batch, False, None, selection, fraction, generator)
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
        return [a.strip() for a in answers], seq
