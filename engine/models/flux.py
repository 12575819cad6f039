"""FLUX (``FluxPipeline``): MMDiT on 2x2-packed latents, guidance as an embedding (no CFG)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

from engine.models.base import DiTAdapter, Embeds, RequestState
from engine.params import ImageParams


class FluxAdapter(DiTAdapter):
    """Guidance-distilled FLUX: ``guidance_scale`` is fed to the transformer, so one forward
    per sample; negative prompts are ignored (the pipeline's default ``true_cfg_scale=1``)."""

    family = "flux"
    pipeline_class = FluxPipeline
    default_steps = 28
    default_guidance = 3.5
    guidance = "embedded"
    max_sequence_length = 512

    def _pipeline_default_size(self) -> int:
        return self.pipe.default_sample_size * self.vae_scale_factor

    @property
    def patch_size(self) -> int:
        # Latents are packed 2x2 into tokens before the transformer.
        return 2

    def cache_blocks(self) -> tuple[list[torch.nn.Module], bool]:
        # The double-stream blocks, then the single-stream ones: both return (text, image).
        t = self.transformer
        return list(t.transformer_blocks) + list(t.single_transformer_blocks), True

    def _encode_batch(self, prompts: list[str], negatives: list[str] | None) -> tuple[Embeds, Embeds | None]:
        embeds, pooled, _text_ids = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device,
            max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}, None

    def _prepare_latents(self, params: ImageParams, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        latents, image_ids = self.pipe.prepare_latents(
            params.n, self.transformer.config.in_channels // 4, params.height, params.width,
            self.dtype, self.device, generator)
        return latents, {"img_ids": image_ids}

    def _set_timesteps(self, scheduler: Any, params: ImageParams, latents: torch.Tensor) -> torch.Tensor:
        steps = params.num_inference_steps
        config = scheduler.config
        sigmas = None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(
            latents.shape[1],
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(scheduler, steps, self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return timesteps

    def _timestep_rows(self, state: RequestState) -> torch.Tensor:
        return state.timesteps[state.step].expand(state.n).to(state.latents.dtype)

    def _forward(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: Embeds,
                 states: list[RequestState], guidance: torch.Tensor) -> torch.Tensor:
        hidden = embeds["encoder_hidden_states"]
        text_ids = torch.zeros(hidden.shape[1], 3, device=self.device, dtype=self._text_ids_dtype())
        return self.transformer(
            hidden_states=latents,
            timestep=timesteps / 1000,
            guidance=guidance if self.transformer.config.guidance_embeds else None,
            pooled_projections=embeds["pooled_projections"],
            encoder_hidden_states=hidden,
            txt_ids=text_ids,
            img_ids=states[0].extra["img_ids"],
            return_dict=False,
        )[0]

    def _text_ids_dtype(self) -> torch.dtype:
        encoder = self.pipe.text_encoder
        return encoder.dtype if encoder is not None else self.transformer.dtype

    def _latents_to_vae(self, latents: torch.Tensor, params: ImageParams) -> torch.Tensor:
        latents = self.pipe._unpack_latents(latents, params.height, params.width, self.vae_scale_factor)
        config = self.pipe.vae.config
        return latents / config.scaling_factor + config.shift_factor
