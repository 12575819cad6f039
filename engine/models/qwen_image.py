"""Qwen-Image (``QwenImagePipeline``): a double-stream MMDiT with true classifier-free guidance.

- Guidance is true CFG: with ``true_cfg_scale > 1`` and a negative prompt (an empty one
  counts) the pipeline runs a second, negative forward and combines
  ``u + s * (c - u)``, rescaled to the conditional prediction's norm along the channels.
  ``guidance_scale`` only reaches transformers with ``guidance_embeds`` (guidance-distilled
  checkpoints); the others ignore it, as the pipeline does.
- Prompts are encoded to their own length (the template's 34-token prefix dropped). A
  batch pads them to its longest and passes ``encoder_hidden_states_mask``: padding
  without the mask would let the image attend to the padding.
- The rotary embedding takes the image size from the batch's first entry only, so the
  latent shape is in the batch key (``ModelInfo.batch_key``) and every row shares it.
- The VAE is a video VAE: its latents carry a frame axis of 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps

from engine.model_info import LatentSpec
from engine.models.base import DiTAdapter, Embeds, RequestState
from engine.params import ImageParams
from engine.prompt_limit import PromptLimit

HIDDEN = "encoder_hidden_states"
MASK = "encoder_hidden_states_mask"


class QwenImageAdapter(DiTAdapter):
    family = "qwen-image"
    pipeline_class = QwenImagePipeline
    default_steps = 50
    # Read only by guidance-distilled transformers (guidance_embeds); true CFG is the default rule.
    default_guidance = 1.0
    guidance = "true_cfg"
    default_true_cfg_scale = 4.0
    max_sequence_length = 512

    def _pipeline_default_size(self) -> int:
        return self.pipe.default_sample_size * self.vae_scale_factor

    def latent_spec(self) -> LatentSpec:
        return LatentSpec(channels=self.pipe.vae.config.z_dim, spatial_compression=self.vae_scale_factor,
                          patch_size=self.patch_size)

    def prompt_limit(self) -> PromptLimit:
        """The pipeline keeps ``max_sequence_length`` tokens of the templated prompt after
        dropping the template's prefix."""
        prefix, suffix = self.pipe.prompt_template_encode.split("{}")
        return PromptLimit(max_tokens=self.max_sequence_length, prefix=prefix, suffix=suffix,
                           skip=self.pipe.prompt_template_encode_start_idx,
                           tokenizer_json=self.pipe.tokenizer.backend_tokenizer.to_str())

    # ----- encode ------------------------------------------------------------------
    def _encode_batch(self, prompts: list[str], negatives: list[str] | None) -> tuple[Embeds, Embeds | None]:
        cond = self._encode(prompts)
        return cond, self._encode(negatives) if negatives is not None else None

    def _encode(self, prompts: list[str]) -> Embeds:
        embeds, mask = self.pipe.encode_prompt(prompts, device=self.device,
                                               max_sequence_length=self.max_sequence_length)
        out = {HIDDEN: embeds}
        if mask is not None:
            out[MASK] = mask
        return out

    def encode(self, prompts: list[str], params: list[ImageParams]) -> list[tuple[Embeds, Embeds | None]]:
        # Each request keeps its prompt at its own length; batches pad again (concat_embeds).
        return [(_trim(cond), _trim(uncond) if uncond is not None else None)
                for cond, uncond in super().encode(prompts, params)]

    def concat_embeds(self, parts: list[Embeds]) -> Embeds:
        """Pad to the longest prompt and mask the padding; no mask when nothing is padded
        (the pipeline's own path for a single prompt)."""
        length = max(p[HIDDEN].shape[1] for p in parts)
        if all(p[HIDDEN].shape[1] == length and MASK not in p for p in parts):
            return {HIDDEN: torch.cat([p[HIDDEN] for p in parts])}
        hidden, masks = [], []
        for p in parts:
            rows, own = p[HIDDEN].shape[:2]
            hidden.append(torch.nn.functional.pad(p[HIDDEN], (0, 0, 0, length - own)))
            mask = p.get(MASK, torch.ones(rows, own, dtype=torch.long, device=p[HIDDEN].device))
            masks.append(torch.nn.functional.pad(mask, (0, length - own)))
        return {HIDDEN: torch.cat(hidden), MASK: torch.cat(masks)}

    # ----- prepare -----------------------------------------------------------------
    def _prepare_latents(self, params: ImageParams, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        latents = self.pipe.prepare_latents(
            params.n, self.transformer.config.in_channels // 4, params.height, params.width,
            self.dtype, self.device, generator)
        return latents, {}

    def _set_timesteps(self, scheduler: Any, params: ImageParams, latents: torch.Tensor) -> torch.Tensor:
        steps = params.num_inference_steps
        config = scheduler.config
        mu = calculate_shift(
            latents.shape[1],
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(scheduler, steps, self.device,
                                          sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        scheduler.set_begin_index(0)
        return timesteps

    # ----- denoise -----------------------------------------------------------------
    def _timestep_rows(self, state: RequestState) -> torch.Tensor:
        return state.timesteps[state.step].expand(state.n).to(state.latents.dtype)

    def _forward(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: Embeds,
                 states: list[RequestState], guidance: torch.Tensor) -> torch.Tensor:
        params = states[0].params
        factor = self.vae_scale_factor * self.patch_size
        image_shape = (1, params.height // factor, params.width // factor)
        return self.transformer(
            hidden_states=latents,
            timestep=timesteps / 1000,
            guidance=guidance if self.transformer.config.guidance_embeds else None,
            encoder_hidden_states_mask=embeds.get(MASK),
            encoder_hidden_states=embeds[HIDDEN],
            img_shapes=[[image_shape]] * latents.shape[0],
            return_dict=False,
        )[0]

    def combine_guidance(self, state: RequestState, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        combined = uncond + state.params.true_cfg_scale * (cond - uncond)
        cond_norm = torch.norm(cond, dim=-1, keepdim=True)
        return combined * (cond_norm / torch.norm(combined, dim=-1, keepdim=True))

    # ----- decode ------------------------------------------------------------------
    def _latents_to_vae(self, latents: torch.Tensor, params: ImageParams) -> torch.Tensor:
        latents = self.pipe._unpack_latents(latents, params.height, params.width, self.vae_scale_factor)
        config = self.pipe.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(latents.device, latents.dtype)
        return latents / inverse_std + mean

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return super()._vae_decode(latents)[:, :, 0]  # drop the frame axis


def _trim(embeds: Embeds) -> Embeds:
    """One request's rows (all the same prompt) cut to the prompt's own length, unmasked."""
    if MASK not in embeds:
        return embeds
    length = int(embeds[MASK].sum(dim=1).max())
    return {HIDDEN: embeds[HIDDEN][:, :length].contiguous()}
