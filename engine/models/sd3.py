"""Stable Diffusion 3 (``StableDiffusion3Pipeline``): MMDiT with joint text+image attention."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    calculate_shift,
    retrieve_timesteps,
)

from engine.models.base import DiTAdapter, Embeds, RequestState
from engine.params import ImageParams


class SD3Adapter(DiTAdapter):
    family = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    default_steps = 28
    default_guidance = 7.0
    max_sequence_length = 256

    def _pipeline_default_size(self) -> int:
        return self.pipe.default_sample_size * self.vae_scale_factor

    def _max_size(self) -> int:
        # Positional embeddings are cropped from a fixed grid of pos_embed_max_size patches.
        return self.transformer.config.pos_embed_max_size * self.patch_size * self.vae_scale_factor

    def _encode_batch(self, prompts: list[str], negatives: list[str] | None) -> tuple[Embeds, Embeds | None]:
        embeds, neg_embeds, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            negative_prompt=negatives,
            do_classifier_free_guidance=negatives is not None,
            device=self.device,
            max_sequence_length=self.max_sequence_length,
        )
        cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        uncond = None
        if negatives is not None:
            uncond = {"encoder_hidden_states": neg_embeds, "pooled_projections": neg_pooled}
        return cond, uncond

    def _prepare_latents(self, params: ImageParams, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        latents = self.pipe.prepare_latents(
            params.n, self.transformer.config.in_channels, params.height, params.width,
            self.dtype, self.device, generator)
        return latents, {}

    def _set_timesteps(self, scheduler: Any, params: ImageParams, latents: torch.Tensor) -> torch.Tensor:
        kwargs = {}
        config = scheduler.config
        if config.get("use_dynamic_shifting", None):
            height, width = latents.shape[-2:]
            seq_len = (height // self.patch_size) * (width // self.patch_size)
            kwargs["mu"] = calculate_shift(
                seq_len,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        timesteps, _ = retrieve_timesteps(scheduler, params.num_inference_steps, self.device, **kwargs)
        return timesteps

    def _forward(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: Embeds,
                 states: list[RequestState], guidance: torch.Tensor) -> torch.Tensor:
        return self.transformer(
            hidden_states=latents,
            timestep=timesteps,
            encoder_hidden_states=embeds["encoder_hidden_states"],
            pooled_projections=embeds["pooled_projections"],
            return_dict=False,
        )[0]

    def _latents_to_vae(self, latents: torch.Tensor, params: ImageParams) -> torch.Tensor:
        config = self.pipe.vae.config
        return latents / config.scaling_factor + config.shift_factor
