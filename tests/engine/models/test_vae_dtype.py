"""float16 pipelines whose VAE overflows in float16 decode in float32, as diffusers' SDXL
pipelines do (PixArt-Sigma ships the SDXL VAE, whose config sets force_upcast)."""

import logging

import numpy as np
import torch

from engine.models.loader import load_adapter, place_vae
from engine.models.presets import build_preset
from engine.request import ImageParams, Limits


def test_a_force_upcast_vae_decodes_in_float32_in_a_float16_pipeline():
    adapter = load_adapter("tiny-pixart", "cpu", "float16")
    assert adapter.pipe.vae.config.force_upcast
    assert adapter.transformer.dtype == torch.float16 and adapter.pipe.vae.dtype == torch.float32
    params = ImageParams(seed=3, num_inference_steps=2, width=64, height=64).resolve(adapter.info(), Limits())
    cond, uncond = adapter.encode(["a red fox"], [params])[0]
    state = adapter.prepare("r", params, cond, uncond)
    adapter.denoise([state])
    assert state.latents.dtype == torch.float16
    [pixels] = adapter.decode([state])
    # A float32 VAE of the same (float16-rounded) weights, on the same latents, by hand.
    vae = build_preset("tiny-pixart").vae.half().float().eval()
    with torch.inference_mode():
        image = vae.decode((state.latents / vae.config.scaling_factor).float(), return_dict=False)[0]
    expected = (adapter.pipe.image_processor.postprocess(image, output_type="np") * 255).round().astype(np.uint8)
    assert np.abs(pixels.astype(int) - expected.astype(int)).max() <= 1


def test_a_vae_without_force_upcast_stays_in_float16_and_flux_is_warned_about(caplog):
    pipe = build_preset("tiny-flux").to(dtype=torch.float16)
    pipe.vae.register_to_config(force_upcast=False)
    with caplog.at_level(logging.WARNING):
        place_vae(pipe, torch.float16)
    assert pipe.vae.dtype == torch.float16
    assert "FLUX overflows in float16" in caplog.text
    pipe = build_preset("tiny-flux").to(dtype=torch.bfloat16)
    place_vae(pipe, torch.bfloat16)  # bfloat16 has float32's range: nothing to do
    assert pipe.vae.dtype == torch.bfloat16
