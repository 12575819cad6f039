"""Built-in model presets: real diffusers pipelines, built in code or shipped in the package.

``shapes`` (the default) is a small trained model whose weights ship with gfdit; the
``tiny-*``/``small-*`` presets are built in code with random weights, for tests and benchmarks.
They let gfdit run, test and benchmark with no model download. Each random preset is a genuine
``PixArtSigmaPipeline`` / ``StableDiffusion3Pipeline`` / ``FluxPipeline`` /
``QwenImagePipeline`` / ``ZImagePipeline`` (``presets_qwen.py``) whose modules
are tiny (a few layers) and seeded, so every build gives the same weights, and whose
tokenizers are built in memory. ``small-pixart`` (~30M parameters) is sized so that on a
CPU the transformer, not Python, dominates a step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from engine.config import DEFAULT_MODEL  # noqa: F401 - re-exported
from engine.models.shapes.preset import SHAPES_DESCRIPTION, SHAPES_SIZE, SHAPES_STEPS, build_shapes
from engine.models.tokenizers import build_clip_tokenizer, build_t5_tokenizer


@dataclass(frozen=True)
class PresetSpec:
    """What a preset is and what the engine should default to for it."""

    build: Callable[[], DiffusionPipeline]
    default_size: int
    default_steps: int
    description: str


def _lazy(path: str) -> Callable[[], DiffusionPipeline]:
    """A builder in another module, imported when the preset is built."""
    def build() -> DiffusionPipeline:
        from engine.models.registry import resolve

        return resolve(path)()

    return build


def _seeded(seed: int, make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a module from a fixed seed without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().eval()


def _t5_encoder(seed: int, vocab_size: int, d_model: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=d_model // 8,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return _seeded(seed, lambda: T5EncoderModel(config))


def _clip_config(tokenizer, hidden: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=hidden,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )


def _vae(seed: int, channels: tuple[int, ...], **kwargs) -> AutoencoderKL:
    """A 4-level VAE (spatial factor 8), the same factor as the real models."""
    return _seeded(
        seed,
        lambda: AutoencoderKL(
            block_out_channels=channels,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=8,
            layers_per_block=1,
            sample_size=256,
            **kwargs,
        ),
    )


def _pixart(layers: int, heads: int, head_dim: int, t5_dim: int, sample_size: int) -> PixArtSigmaPipeline:
    tokenizer = build_t5_tokenizer(model_max_length=300)
    transformer = _seeded(
        1,
        lambda: PixArtTransformer2DModel(
            num_attention_heads=heads,
            attention_head_dim=head_dim,
            in_channels=4,
            out_channels=8,
            num_layers=layers,
            cross_attention_dim=heads * head_dim,
            caption_channels=t5_dim,
            sample_size=sample_size,
            patch_size=2,
            use_additional_conditions=False,
        ),
    )
    return PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=_t5_encoder(2, len(tokenizer), t5_dim),
        vae=_vae(3, (8, 16, 32, 32)),
        transformer=transformer,
        # v-prediction keeps random-weight latents O(1) (epsilon blows x0 up ~1/alpha).
        scheduler=DPMSolverMultistepScheduler(prediction_type="v_prediction"),
    )


def build_tiny_pixart() -> PixArtSigmaPipeline:
    return _pixart(layers=2, heads=4, head_dim=8, t5_dim=32, sample_size=32)


def build_small_pixart() -> PixArtSigmaPipeline:
    # 12 layers of width 384 (8 heads of 48): ~30M parameters, divisible for degrees 2, 4, 8.
    return _pixart(layers=12, heads=8, head_dim=48, t5_dim=64, sample_size=64)


def build_tiny_sd3() -> StableDiffusion3Pipeline:
    clip_tokenizer = build_clip_tokenizer()
    t5_tokenizer = build_t5_tokenizer(model_max_length=256)
    clip_config = _clip_config(clip_tokenizer)
    transformer = _seeded(
        1,
        lambda: SD3Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=32,
            caption_projection_dim=32,
            pooled_projection_dim=64,
            out_channels=4,
            pos_embed_max_size=64,
        ),
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(3, (8, 16, 32, 32), shift_factor=0.0609, scaling_factor=1.5305,
                 use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_seeded(4, lambda: CLIPTextModelWithProjection(clip_config)),
        tokenizer=clip_tokenizer,
        text_encoder_2=_seeded(5, lambda: CLIPTextModelWithProjection(clip_config)),
        tokenizer_2=clip_tokenizer,
        text_encoder_3=_t5_encoder(2, len(t5_tokenizer), 32),
        tokenizer_3=t5_tokenizer,
    )


def build_tiny_flux() -> FluxPipeline:
    clip_tokenizer = build_clip_tokenizer()
    t5_tokenizer = build_t5_tokenizer(model_max_length=512)
    transformer = _seeded(
        1,
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
        shift=3.0, use_dynamic_shifting=True,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=_vae(3, (8, 16, 32, 32), shift_factor=0.1159, scaling_factor=0.3611,
                 use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_seeded(4, lambda: CLIPTextModel(_clip_config(clip_tokenizer))),
        tokenizer=clip_tokenizer,
        text_encoder_2=_t5_encoder(2, len(t5_tokenizer), 32),
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


PRESETS: dict[str, PresetSpec] = {
    "shapes": PresetSpec(build_shapes, SHAPES_SIZE, SHAPES_STEPS, SHAPES_DESCRIPTION),
    "tiny-pixart": PresetSpec(build_tiny_pixart, 256, 20, "PixArt-Sigma, 2 layers, random weights"),
    "small-pixart": PresetSpec(build_small_pixart, 512, 20, "PixArt-Sigma, 12 layers x 384 (~30M), random weights"),
    "tiny-sd3": PresetSpec(build_tiny_sd3, 256, 28, "Stable Diffusion 3, 2 layers, random weights"),
    "tiny-flux": PresetSpec(build_tiny_flux, 256, 28, "FLUX, 1+1 layers, random weights"),
    "tiny-qwen-image": PresetSpec(_lazy("engine.models.presets_qwen:build_tiny_qwen_image"), 256, 20,
                                  "Qwen-Image, 2 layers, Qwen2.5-VL text encoder, random weights"),
    "tiny-z-image": PresetSpec(_lazy("engine.models.presets_qwen:build_tiny_z_image"), 256, 20,
                               "Z-Image, 1+2 layers, Qwen3 text encoder, random weights"),
    "tiny-sana": PresetSpec(_lazy("engine.models.tiny_sana:build_tiny_sana"), 64, 20,
                            "SANA, 1 layer, random weights (no native adapter: the whole-pipeline fallback)"),
}


def build_preset(name: str) -> DiffusionPipeline:
    """Build the named preset pipeline (fp32, CPU, every module in eval mode)."""
    try:
        spec = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}") from None
    return spec.build()
