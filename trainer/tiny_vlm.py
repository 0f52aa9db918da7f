"""Tiny random Qwen-VL checkpoints (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) that load offline, for tests and benches.

Each is built from a config, saved with `save_pretrained` beside a word-level tokenizer (made with the
`tokenizers` library over the synthetic scenes' words) and a Qwen2-VL image processor, so the folder loads the
way a real downloaded checkpoint does: AutoModelForImageTextToText, AutoTokenizer, AutoImageProcessor.
Patches of 4 pixels merged 2x2: a 64x64 scene becomes an 8x8 grid of merged visual tokens.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .data import VOCAB

# A frozen random LM at the default init (std 0.02) keeps every logit near zero and no LoRA can make it name an
# answer; the wider init of the synthetic path's tiny LM gives the frozen head range (a pretrained base has it).
from .model import TINY_LM_INIT_STD

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
SPECIALS = ["<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "[UNK]"]
QUESTION_WORDS = ["what", "shape", "is", "the", "object?", "where", "answer:"]
PATCH = 4


def build_tiny_vlm(directory: str | Path, family: str = "qwen2_vl", hidden: int = 64, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not one of {', '.join(FAMILIES)}")
    directory = Path(directory)
    words = [w for w in VOCAB if not w.startswith("<") and not w.endswith("?")] + QUESTION_WORDS
    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token="[UNK]")
    rope = {"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 10000.0}
    text = dict(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_parameters=rope,
                eos_token_id=0, pad_token_id=0, bos_token_id=0, tie_word_embeddings=False,
                initializer_range=TINY_LM_INIT_STD)
    ids = dict(image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
               vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"])
    vision = dict(depth=2, hidden_size=hidden, num_heads=2, patch_size=PATCH, spatial_merge_size=2,
                  initializer_range=TINY_LM_INIT_STD)
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model

        vision = dict(vision, embed_dim=hidden, mlp_ratio=2)
    elif family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        vision = dict(vision, out_hidden_size=hidden, intermediate_size=2 * hidden, window_size=16,
                      fullatt_block_indexes=[1])
    else:
        from transformers import Qwen3VLConfig as Config
        from transformers import Qwen3VLForConditionalGeneration as Model

        text = dict(text, head_dim=hidden // 4, rope_parameters=dict(rope, mrope_interleaved=True))
        vision = dict(vision, out_hidden_size=hidden, intermediate_size=2 * hidden, num_position_embeddings=256,
                      deepstack_visual_indexes=[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Model(Config(text_config=text, vision_config=vision, **ids))
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32,
                             max_pixels=256 * 256).save_pretrained(directory)
    return directory
