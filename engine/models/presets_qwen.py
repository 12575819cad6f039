"""Tiny Qwen-Image and Z-Image pipelines with random weights, built in code.

Both are genuine diffusers pipelines (``QwenImagePipeline``, ``ZImagePipeline``) whose
modules are a few layers wide and seeded, with Qwen's byte-level BPE tokenizer built in
memory, so they run, save and reload without a hub. The schedulers carry the real
checkpoints' settings (Qwen-Image's exponential dynamic shift, Z-Image's static shift 3).
"""

from __future__ import annotations

from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3Model,
)

from engine.models.presets import _seeded
from engine.models.tokenizer_qwen import build_qwen_tokenizer

TEXT_HIDDEN = 32


def _qwen_image_text_encoder(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    head_dim = TEXT_HIDDEN // 2
    special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.pad_token_id,
               "eos_token_id": tokenizer.eos_token_id}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": TEXT_HIDDEN, "intermediate_size": 2 * TEXT_HIDDEN,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
            "max_position_embeddings": 2048, **special,
            # The multimodal rotary sections must sum to half a head.
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, head_dim // 2 - 5],
                                "rope_theta": 1e6},
        },
        **special,
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                       "out_hidden_size": TEXT_HIDDEN, "fullatt_block_indexes": [1]},
    )
    return _seeded(12, lambda: Qwen2_5_VLForConditionalGeneration(config))


def build_tiny_qwen_image() -> QwenImagePipeline:
    tokenizer = build_qwen_tokenizer()
    transformer = _seeded(
        11,
        lambda: QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=TEXT_HIDDEN, axes_dims_rope=(4, 6, 6),
        ),
    )
    vae = _seeded(
        13,
        lambda: AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                       temperal_downsample=[False, True, True]),
    )
    # Qwen-Image's own scheduler settings: resolution-dependent exponential shift.
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True,
    )
    return QwenImagePipeline(
        scheduler=scheduler, vae=vae, transformer=transformer, tokenizer=tokenizer,
        text_encoder=_qwen_image_text_encoder(tokenizer),
    )


def _z_image_text_encoder(tokenizer: Qwen2Tokenizer) -> Qwen3Model:
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=2 * TEXT_HIDDEN, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=TEXT_HIDDEN // 2, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _seeded(22, lambda: Qwen3Model(config))


def build_tiny_z_image() -> ZImagePipeline:
    tokenizer = build_qwen_tokenizer()
    transformer = _seeded(
        21,
        lambda: ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2, n_refiner_layers=1,
            n_heads=4, n_kv_heads=4, cap_feat_dim=TEXT_HIDDEN, axes_dims=[4, 6, 6], axes_lens=[1024, 256, 256],
        ),
    )
    # The FLUX VAE layout Z-Image uses: 16 latent channels, spatial factor 8.
    vae = _seeded(
        23,
        lambda: AutoencoderKL(
            block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, norm_num_groups=8, layers_per_block=1,
            sample_size=256, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
            use_post_quant_conv=False,
        ),
    )
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False),
        vae=vae, transformer=transformer, tokenizer=tokenizer,
        text_encoder=_z_image_text_encoder(tokenizer),
    )
