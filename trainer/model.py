"""The ARR-COC adapter: three scorers, the tension balancer, the token allocator, and a LoRA'd causal LM.

Forward pass, per image and query:
  texture/entropy/edges (no grad) -> P (entropy), S (salience), Q (learned query coupling)
  -> r = c*(P+S)/2 + (1-c)*Q -> top-K cells (Gumbel-top-K while training) -> budgets b_i
  -> one visual token per selected cell, its pixel detail set by its budget, times the straight-through
     gate 1 + r_i - stopgrad(r_i) (forward unchanged, gradient reaches the scorers)
  -> frozen LM + LoRA reads [BOS, visual tokens, QTYPE, COLOUR, SEP, ANSWER] and predicts ANSWER, EOS.
"""
from __future__ import annotations

import contextlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model

from .config import TrainConfig
from .data import ANSWER_IDS, TOKEN, VOCAB
from .errors import UserError
from .texture import CHANNELS, CellFeatures, cell_features

# peft 0.21 still calls a transformers method that transformers 5 renamed; the warning is theirs, not ours
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

TINY_LM_SEED = 1234  # the tiny base LM is a function of its config and this seed, so adapters reload onto it
# The tiny LM is random and frozen. At transformers' default init (std 0.02) its frozen lm_head keeps every
# logit near zero, so no LoRA update can make it name an answer (answer_accuracy stays at chance). A wider init
# gives the frozen head enough range for the adapter to steer; a pretrained base does not need this.
TINY_LM_INIT_STD = 0.15


def build_base_lm(cfg: TrainConfig) -> tuple[nn.Module, list[int]]:
    """The frozen base LM and the LM token id of each of our vocabulary words."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if cfg.base_model == "tiny":
        config = LlamaConfig(
            vocab_size=len(VOCAB), hidden_size=cfg.tiny_hidden, intermediate_size=2 * cfg.tiny_hidden,
            num_hidden_layers=cfg.tiny_layers, num_attention_heads=cfg.tiny_heads,
            num_key_value_heads=cfg.tiny_heads, max_position_embeddings=128,
            bos_token_id=TOKEN["<bos>"], eos_token_id=TOKEN["<eos>"], pad_token_id=TOKEN["<pad>"],
            initializer_range=TINY_LM_INIT_STD,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_LM_SEED)
            lm = LlamaForCausalLM(config)
        return lm, list(range(len(VOCAB)))
    lm = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=torch.float32)
    return lm, _vocab_ids(cfg.base_model, lm.get_input_embeddings().num_embeddings)


def _vocab_ids(name_or_path: str, lm_vocab: int) -> list[int]:
    """Map our words onto a pretrained LM's tokens: first sub-token of each word when it ships a
    tokenizer, else the first len(VOCAB) ids (a model saved without a tokenizer)."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError):
        ids = list(range(len(VOCAB)))
    else:
        ids = [tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in VOCAB]
        if len(set(ids)) < len(ids):  # words sharing a first sub-token would be indistinguishable
            ids = list(range(len(VOCAB)))
    if max(ids) >= lm_vocab:
        raise ValueError(f"base model {name_or_path} has {lm_vocab} tokens; our vocabulary needs {len(VOCAB)}")
    return ids


class ParticipatoryScorer(nn.Module):
    """Q: 1x1 convs over the texture cells, cosine with a projected query embedding, mapped to [0,1]."""

    def __init__(self, lm_width: int, hidden: int):
        super().__init__()
        self.cells = nn.Sequential(nn.Conv2d(len(CHANNELS), hidden, 1), nn.GELU(), nn.Conv2d(hidden, hidden, 1))
        self.query = nn.Linear(lm_width, hidden)
        self.scale = nn.Parameter(torch.tensor([5.0]))  # 1-d: DeepSpeed broadcasts parameters as bytes
        self.bias = nn.Parameter(torch.tensor([0.0]))

    def forward(self, texture: torch.Tensor, query_embedding: torch.Tensor) -> torch.Tensor:
        cells = F.normalize(self.cells(texture), dim=1)  # [B,H,G,G]
        query = F.normalize(self.query(query_embedding), dim=-1)  # [B,H]
        cosine = torch.einsum("bhyx,bh->byx", cells, query)
        return torch.sigmoid(self.scale * cosine + self.bias)


@dataclass
class Allocation:
    relevance: torch.Tensor  # r [B, G*G]
    selected: torch.Tensor  # [B, K] cell indices
    budget: torch.Tensor  # [B, K] tokens per selected cell, summing to the fixed total
    share: torch.Tensor  # [B, G*G] allocation distribution a (zero outside the selection)


def cells_selected(cfg: TrainConfig) -> int:
    return int(round(cfg.k_max - cfg.focus_vs_diversify * (cfg.k_max - cfg.k_min)))


def budget_gamma(cfg: TrainConfig) -> float:
    return cfg.gamma_min * (cfg.gamma_max / cfg.gamma_min) ** cfg.focus_vs_diversify


def allocate(r: torch.Tensor, cfg: TrainConfig, noise: torch.Tensor | None = None) -> Allocation:
    """Top-K of r (of logit(r) + Gumbel noise while training), budgets b_i = 1 + (L-1) rhat_i^gamma."""
    k = cells_selected(cfg)
    logits = torch.logit(r.detach().clamp(1e-4, 1 - 1e-4))
    if noise is not None:
        logits = logits + noise
    selected = logits.topk(k, dim=-1).indices
    r_sel = r.detach().gather(-1, selected)
    rhat = r_sel / r_sel.max(dim=-1, keepdim=True).values.clamp_min(1e-8)
    raw = 1 + (cfg.max_tokens_per_cell - 1) * rhat ** budget_gamma(cfg)
    total = k * (1 + cfg.max_tokens_per_cell) / 2  # fixed token total for the chosen K
    budget = raw * total / raw.sum(-1, keepdim=True)
    share = torch.zeros_like(r).scatter(-1, selected, budget / budget.sum(-1, keepdim=True))
    return Allocation(r, selected, budget, share)


def gumbel_noise(shape: torch.Size, cfg: TrainConfig, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor | None:
    """Gumbel(0, scale) noise drawn where the generator lives (a device generator: no host-to-device copy)."""
    scale = cfg.sigma_max * (1 - cfg.exploit_vs_explore)
    if scale == 0:
        return None
    device = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, device=device).clamp(1e-9, 1 - 1e-9)
    return -scale * torch.log(-torch.log(u))


def level_of_detail(pixels: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """A cell's pixels at the resolution its budget buys: n tokens ~ an s x s view, s = 2^floor(log4 n).

    pixels [B,K,3,h,w], budget [B,K] -> [B,K,3*h*w]; the view is upsampled back so every token has one width.
    Every level is computed for every cell and the right one picked on the device: selecting cells by level
    would need the levels on the host (a device sync each step) and data-dependent shapes.
    """
    b, k, c, h, w = pixels.shape
    flat = pixels.reshape(b * k, c, h, w)
    sides = [2 ** i for i in range(h.bit_length()) if 2 ** i < h] + [h]
    views = torch.stack([F.interpolate(F.adaptive_avg_pool2d(flat, s), size=(h, w), mode="nearest") for s in sides])
    level = torch.floor(torch.log(budget.reshape(-1).clamp_min(1)) / math.log(4)).long().clamp(max=len(sides) - 1)
    out = views.gather(0, level.view(1, -1, 1, 1, 1).expand(1, -1, c, h, w))[0]
    return out.reshape(b, k, c * h * w)


def freeze_base(base: nn.Module, cfg: TrainConfig) -> None:
    """Freeze the base model (LM or VLM) in place, in the precision and with the checkpointing cfg asks for."""
    for p in base.parameters():
        p.requires_grad_(False)
    if cfg.precision == "bf16":
        # The frozen base is stored in bf16 (half the memory); peft upcasts the LoRA weights it adds to fp32
        # (autocast_adapter_dtype), so every trainable weight and its optimizer state stay fp32.
        base.to(torch.bfloat16)
    if cfg.activation_checkpointing:
        # non-reentrant: the decoder's inputs (our visual tokens) carry gradients, the frozen weights do not
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


class TrainableState:
    """What checkpoints and adapters hold, for both models (ArrCoc, ArrCocVLM): the trainable tensors (the
    LoRA and the ARR-COC modules) and the config. `base_name` names the attribute holding the peft-wrapped
    frozen base, whose save_pretrained writes the LoRA files."""

    base_name: str

    def trainable_state(self) -> dict[str, torch.Tensor]:
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k in names}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = {n for n, p in self.named_parameters() if p.requires_grad} - set(state)
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[0]}")
        self.load_state_dict(state, strict=False)

    def save_adapter(self, directory: Path) -> None:
        """peft adapter files + the ARR-COC modules (everything trainable outside the base) + the config."""
        getattr(self, self.base_name).save_pretrained(str(directory))
        modules = {k: v for k, v in self.trainable_state().items() if not k.startswith(self.base_name + ".")}
        torch.save(modules, directory / ADAPTER_MODULES)
        (directory / ADAPTER_CONFIG).write_text(json.dumps(self.cfg.to_dict(), indent=2, sort_keys=True) + "\n")


class ArrCoc(TrainableState, nn.Module):
    """The whole adapter around a frozen LM. With adapter_dir, the LoRA weights come from a saved adapter."""

    base_name = "lm"

    def __init__(self, cfg: TrainConfig, adapter_dir: Path | None = None):
        super().__init__()
        self.cfg = cfg
        base, vocab_ids = build_base_lm(cfg)
        freeze_base(base, cfg)
        if adapter_dir is None:
            lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear")
            self.lm = get_peft_model(base, lora)
        else:
            self.lm = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
        self.register_buffer("vocab_ids", torch.tensor(vocab_ids), persistent=False)
        width = base.get_input_embeddings().embedding_dim
        cell = cfg.image_size // cfg.grid
        self.participatory = ParticipatoryScorer(width, cfg.scorer_hidden)
        self.projector = nn.Sequential(nn.Linear(3 * cell * cell + len(CHANNELS), width), nn.GELU(),
                                       nn.Linear(width, width))
        self.row = nn.Embedding(cfg.grid, width)
        self.col = nn.Embedding(cfg.grid, width)
        for emb in (self.row, self.col):
            nn.init.normal_(emb.weight, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.vocab_ids.device

    @property
    def base(self) -> nn.Module:
        """The frozen base LM under the LoRA."""
        return self.lm.get_base_model()

    def training_noise(self, batch: dict, generator: torch.Generator | None) -> torch.Tensor | None:
        """The Gumbel noise of one training batch, on the model's device; its shape is the model's business."""
        size = batch["images"].shape[0]
        return gumbel_noise(torch.Size((size, self.cfg.grid * self.cfg.grid)), self.cfg, generator, self.device)

    def embed_words(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(self.vocab_ids[ids])

    def score(self, feats: CellFeatures, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """P, S and Q maps [B, G*G], each in [0,1]."""
        p = feats.entropy.flatten(1)
        edges = feats.edges.flatten(1)
        s = edges / edges.max(dim=-1, keepdim=True).values.clamp_min(1e-8)
        with torch.no_grad():
            query_embedding = self.embed_words(queries).mean(1)
        q = self.participatory(feats.texture, query_embedding).flatten(1)
        return p, s, q

    def forward(self, batch: dict[str, torch.Tensor], noise: torch.Tensor | None = None,
                random_relevance: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        bf16 = cfg.precision == "bf16"
        device_type = batch["images"].device.type
        # (autocast only when asked for: the meta device, which the device tests use, has no autocast)
        with torch.no_grad(), torch.autocast(device_type, enabled=False) if bf16 else contextlib.nullcontext():
            feats = cell_features(batch["images"], cfg.grid)  # fp32 features in either precision
        with torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            return self._adapt(batch, feats, noise, random_relevance)

    def _adapt(self, batch, feats: CellFeatures, noise, random_relevance) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        p, s, q = self.score(feats, batch["queries"])
        c = cfg.compress_vs_particularize
        r = c * (p + s) / 2 + (1 - c) * q if random_relevance is None else random_relevance
        alloc = allocate(r, cfg, noise)
        sel = alloc.selected
        pixels = feats.pixels.gather(1, sel[..., None, None, None].expand(-1, -1, *feats.pixels.shape[2:]))
        texture = feats.texture.flatten(2).transpose(1, 2).gather(1, sel[..., None].expand(-1, -1, len(CHANNELS)))
        tokens = self.projector(torch.cat([level_of_detail(pixels, alloc.budget), texture], dim=-1))
        tokens = tokens + self.row(sel // cfg.grid) + self.col(sel % cfg.grid)
        r_sel = r.gather(1, sel)
        tokens = tokens * (1 + r_sel - r_sel.detach())[..., None]  # straight-through gate
        b = tokens.shape[0]
        bos = torch.full((b, 1), TOKEN["<bos>"], device=tokens.device)
        sep = torch.full((b, 1), TOKEN["<sep>"], device=tokens.device)
        answer = batch["answers"][:, None]
        text = self.embed_words(torch.cat([batch["queries"], sep, answer], dim=1))
        inputs = torch.cat([self.embed_words(bos), tokens, text], dim=1)
        logits = self.lm(inputs_embeds=inputs).logits[..., self.vocab_ids]  # our vocabulary only
        # position -3 (SEP) predicts ANSWER; the last position (ANSWER) predicts EOS
        answer_logits = logits[:, -2].float()
        eos_logits = logits[:, -1].float()
        eos = torch.full_like(batch["answers"], TOKEN["<eos>"])
        lm_loss = (F.cross_entropy(answer_logits, batch["answers"]) + F.cross_entropy(eos_logits, eos)) / 2
        target = (batch["relevance"].flatten(1).gather(1, sel) > 0).float()
        aux = F.binary_cross_entropy(q.gather(1, sel).clamp(1e-6, 1 - 1e-6), target)
        loss = lm_loss + cfg.aux_weight * aux if random_relevance is None else lm_loss
        answer_only = answer_logits.new_full(answer_logits.shape, float("-inf"))
        answer_only[:, ANSWER_IDS] = answer_logits[:, ANSWER_IDS]
        return {"loss": loss, "lm_loss": lm_loss, "aux_loss": aux, "share": alloc.share,
                "selected": sel, "relevance": r, "prediction": answer_only.argmax(-1),
                "answer_loss": F.cross_entropy(answer_logits, batch["answers"], reduction="none")}


ADAPTER_MODULES = "arrcoc_modules.pt"
ADAPTER_CONFIG = "arrcoc_config.json"


class AdapterError(UserError):
    """A saved adapter folder that cannot be loaded: one line, exit code 2."""
