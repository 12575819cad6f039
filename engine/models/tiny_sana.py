"""``tiny-sana``: a SanaPipeline with random weights, built in code.

SANA has no native adapter: the preset exists to run (and test) the whole-pipeline
fallback on a real diffusers family. Gemma2 text encoder, a 2-level ``AutoencoderDC`` (so
the VAE factor is 2), a one-layer ``SanaTransformer2DModel``, and a Gemma BPE tokenizer
built in memory (``add_bos_token=True``: the pipeline's prompts start with <bos>).
"""

from __future__ import annotations

import string

import torch
from diffusers import (
    AutoencoderDC,
    FlowMatchEulerDiscreteScheduler,
    SanaPipeline,
    SanaTransformer2DModel,
)
from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

from engine.models.tokenizers import _PROMPT_WORDS as PROMPT_WORDS


def _seeded(seed: int, make) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().eval()


def build_gemma_tokenizer(model_max_length: int = 4096) -> GemmaTokenizer:
    """A SentencePiece-style BPE ("▁" marks a word start) over letters, digits and
    punctuation, with merges that make each prompt word one piece."""
    vocab: dict[str, int] = {}
    for token in ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "▁"):
        vocab[token] = len(vocab)
    for char in string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(char, len(vocab))
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in PROMPT_WORDS:
        current = "▁"
        for char in word:
            pair = (current, char)
            current += char
            if pair not in seen:
                merges.append(pair)
                seen.add(pair)
            vocab.setdefault(current, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, model_max_length=model_max_length)


def build_tiny_sana() -> SanaPipeline:
    tokenizer = build_gemma_tokenizer()
    text_config = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    transformer = _seeded(1, lambda: SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=8,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=32,
        sample_size=32))
    vae = _seeded(3, lambda: AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        downsample_block_type="conv", upsample_block_type="interpolate",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407))
    return SanaPipeline(
        tokenizer=tokenizer, text_encoder=_seeded(2, lambda: Gemma2Model(text_config)), vae=vae,
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
