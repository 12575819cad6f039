"""The shapes model's modules, all stock diffusers / transformers classes built from configs.

Together they form a ``PixArtSigmaPipeline`` at 64 px: a 3-level AutoencoderKL (spatial
factor 4, so 16x16x4 latents) and a PixArt transformer over 4x4 latent patches (16 tokens), a 1-layer T5 encoder trained with
the transformer, a Unigram tokenizer over the caption vocabulary, and a PixArt transformer.
"""

from __future__ import annotations

import string

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
)
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from engine.models.shapes.dataset import IMAGE_SIZE, VOCABULARY

VAE_FACTOR = 4
LATENT_CHANNELS = 4
LATENT_SIZE = IMAGE_SIZE // VAE_FACTOR
TEXT_DIM = 64
MAX_CAPTION_TOKENS = 16  # the longest caption is 14 pieces; padding is masked out


def build_tokenizer() -> T5Tokenizer:
    """A Unigram tokenizer with T5's special tokens (pad=0, eos=1, unk=2), a piece per caption word."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    seen = {p for p, _ in pieces}
    for word in VOCABULARY:
        pieces.append(("▁" + word, -3.0))
        seen.add("▁" + word)
    # Single characters keep any other text tokenizable (as pieces the model never saw).
    for char in string.ascii_letters + string.digits + string.punctuation:
        for piece, score in ((char, -10.0), ("▁" + char, -10.5)):
            if piece not in seen:
                pieces.append((piece, score))
                seen.add(piece)
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=300)


def build_text_encoder(vocab_size: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=32, d_ff=2 * TEXT_DIM, num_layers=1,
        num_heads=2, relative_attention_num_buckets=16, relative_attention_max_distance=32,
        dropout_rate=0.0, feed_forward_proj="gated-gelu", decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1,
    )
    return T5EncoderModel(config)


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=LATENT_CHANNELS,
        # Several channels per group: with one, GroupNorm removes each channel's mean, and the
        # colour of a flat image is exactly that mean (the decoder could not learn it).
        norm_num_groups=2,
        layers_per_block=1,
        sample_size=IMAGE_SIZE,
    )


def build_transformer(layers: int = 4, heads: int = 4, head_dim: int = 32, patch_size: int = 4) -> PixArtTransformer2DModel:
    return PixArtTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=layers,
        cross_attention_dim=heads * head_dim,
        caption_channels=TEXT_DIM,
        sample_size=LATENT_SIZE,
        patch_size=patch_size,
        use_additional_conditions=False,
        dropout=0.0,
    )


def build_scheduler() -> DPMSolverMultistepScheduler:
    # v-prediction: the target stays O(1) at every noise level, which trains faster than
    # epsilon on images that are almost a function of their caption.
    return DPMSolverMultistepScheduler(prediction_type="v_prediction")


def assemble(tokenizer: T5Tokenizer, text_encoder: T5EncoderModel, vae: AutoencoderKL,
             transformer: PixArtTransformer2DModel) -> PixArtSigmaPipeline:
    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                               transformer=transformer, scheduler=build_scheduler())
    for module in (text_encoder, vae, transformer):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
