"""PixArt-Sigma (``PixArtSigmaPipeline``): T5 cross-attention DiT, epsilon/learned-sigma output."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import PixArtSigmaPipeline
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import retrieve_timesteps

from engine.models.base import DiTAdapter, Embeds, RequestState
from engine.params import ImageParams


class PixArtAdapter(DiTAdapter):
    """Matches ``pipeline(..., use_resolution_binning=False)``: gfdit makes the size asked."""

    family = "pixart"
    pipeline_class = PixArtSigmaPipeline
    default_steps = 20
    default_guidance = 4.5
    max_sequence_length = 300

    def _pipeline_default_size(self) -> int:
        return self.transformer.config.sample_size * self.vae_scale_factor

    def cache_blocks(self) -> tuple[list[torch.nn.Module], bool]:
        # Single-stream blocks: each returns the hidden states alone.
        return list(self.transformer.transformer_blocks), False

    def _encode_batch(self, prompts: list[str], negatives: list[str] | None) -> tuple[Embeds, Embeds | None]:
        embeds, mask, neg_embeds, neg_mask = self.pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=negatives is not None,
            negative_prompt=negatives if negatives is not None else "",
            device=self.device,
            clean_caption=False,
            max_sequence_length=self.max_sequence_length,
        )
        cond = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
        uncond = None
        if negatives is not None:
            uncond = {"encoder_hidden_states": neg_embeds, "encoder_attention_mask": neg_mask}
        return cond, uncond

    def _prepare_latents(self, params: ImageParams, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        latents = self.pipe.prepare_latents(
            params.n, self.transformer.config.in_channels, params.height, params.width,
            self.dtype, self.device, generator)
        return latents, {}

    def _set_timesteps(self, scheduler: Any, params: ImageParams, latents: torch.Tensor) -> torch.Tensor:
        timesteps, _ = retrieve_timesteps(scheduler, params.num_inference_steps, self.device)
        return timesteps

    def _step_kwargs(self, state: RequestState) -> dict[str, Any]:
        # The pipeline hands its generator (and eta) to schedulers whose step takes them;
        # the request's scheduler is of the pipeline's scheduler class, which it inspects.
        return self.pipe.prepare_extra_step_kwargs(state.generator, 0.0)

    def _timestep_rows(self, state: RequestState) -> torch.Tensor:
        return state.timesteps[state.step][None].expand(state.n)

    def _model_input(self, state: RequestState) -> torch.Tensor:
        return state.scheduler.scale_model_input(state.latents, state.timesteps[state.step])

    def _forward(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: Embeds,
                 states: list[RequestState], guidance: torch.Tensor) -> torch.Tensor:
        return self.transformer(
            latents,
            encoder_hidden_states=embeds["encoder_hidden_states"],
            encoder_attention_mask=embeds["encoder_attention_mask"],
            timestep=timesteps,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )[0]

    def _postprocess_noise(self, noise: torch.Tensor) -> torch.Tensor:
        # Learned-sigma models predict (epsilon, variance); the sampler uses epsilon only.
        if self.transformer.config.out_channels // 2 == self.transformer.config.in_channels:
            return noise.chunk(2, dim=1)[0]
        return noise

    def _latents_to_vae(self, latents: torch.Tensor, params: ImageParams) -> torch.Tensor:
        return latents / self.pipe.vae.config.scaling_factor
