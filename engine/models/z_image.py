"""Z-Image (``ZImagePipeline``): a single-stream DiT over ``[image; caption]``, Qwen3 captions.

- The transformer takes lists: one latent and one caption of its own length per row, and
  pads and masks the batch itself, so prompts of any lengths share a call as they are.
- CFG is on for any ``guidance_scale > 0`` (not > 1) and combines ``c + g * (c - u)``.
  Two per-request options of the pipeline apply per request: ``cfg_normalization``
  (> 0: the guided prediction's norm is capped at that multiple of the conditional one's)
  and ``cfg_truncation`` (guidance stops once the normalised time ``(1000 - t) / 1000``
  passes it; 1, the default, never). A truncated step runs no negative row, so one call
  can hold requests with and without their negative rows.
- The timestep fed to the transformer is ``(1000 - t) / 1000`` and the prediction is
  negated before the scheduler step; latents stay in float32.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ZImagePipeline
from diffusers.pipelines.z_image.pipeline_z_image import (
    calculate_shift,
    get_default_z_image_sigmas,
    retrieve_timesteps,
)

from engine.models.base import DiTAdapter, Embeds, RequestState
from engine.params import ImageParams
from engine.prompt_limit import PromptLimit

CAPTION = "cap_feats"
# The pipeline's defaults: no norm cap, guidance at every step.
DEFAULT_CFG_NORMALIZATION = 0.0
DEFAULT_CFG_TRUNCATION = 1.0


class ZImageAdapter(DiTAdapter):
    family = "z-image"
    pipeline_class = ZImagePipeline
    default_steps = 50
    default_guidance = 5.0
    cfg_threshold = 0.0
    max_sequence_length = 512
    # Its transformer takes lists of rows in its own order (see denoise), which the per-row
    # LoRA assignment does not follow yet: refuse loras rather than ignore them.
    per_request_lora = False

    def _pipeline_default_size(self) -> int:
        return 1024

    def cache_blocks(self) -> None:
        # Its own denoise hands the transformer lists of rows in its own order, which the
        # per-row cache entries do not follow yet: requests naming a cache are refused.
        return None

    @property
    def patch_size(self) -> int:
        return 2

    @property
    def num_heads(self) -> int:
        return self.transformer.config.n_heads

    def prompt_limit(self) -> PromptLimit:
        """The pipeline reads ``max_sequence_length`` tokens of the prompt in its chat template."""
        marker = "\x00prompt\x00"
        text = self.pipe.tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                                       add_generation_prompt=True, enable_thinking=True)
        prefix, suffix = text.split(marker)
        return PromptLimit(max_tokens=self.max_sequence_length, prefix=prefix, suffix=suffix,
                           tokenizer_json=self.pipe.tokenizer.backend_tokenizer.to_str())

    # ----- encode ------------------------------------------------------------------
    def _encode_batch(self, prompts: list[str], negatives: list[str] | None) -> tuple[Embeds, Embeds | None]:
        raise NotImplementedError("Z-Image captions keep their own lengths; see encode")

    @torch.inference_mode()
    def encode(self, prompts: list[str], params: list[ImageParams]) -> list[tuple[Embeds, Embeds | None]]:
        """One caption per request at its own length, as (n, length, dim) rows."""
        results: list[tuple[Embeds, Embeds | None] | None] = [None] * len(prompts)
        for use_cfg in (False, True):
            idx = [i for i, p in enumerate(params) if self.cfg(p) == use_cfg]
            if not idx:
                continue
            # encode_prompt templates its argument in place: hand it fresh lists.
            cond, uncond = self.pipe.encode_prompt(
                prompt=[prompts[i] for i in idx], device=self.device, do_classifier_free_guidance=use_cfg,
                negative_prompt=[params[i].negative_prompt or "" for i in idx] if use_cfg else None,
                max_sequence_length=self.max_sequence_length)
            for row, i in enumerate(idx):
                n = params[i].n
                results[i] = ({CAPTION: _rows(cond[row], n)}, {CAPTION: _rows(uncond[row], n)} if use_cfg else None)
        return results  # type: ignore[return-value]

    # ----- prepare -----------------------------------------------------------------
    def _prepare_latents(self, params: ImageParams, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        latents = self.pipe.prepare_latents(
            params.n, self.transformer.in_channels, params.height, params.width, torch.float32, self.device,
            generator)
        return latents, {}

    def _set_timesteps(self, scheduler: Any, params: ImageParams, latents: torch.Tensor) -> torch.Tensor:
        steps = params.num_inference_steps
        config = scheduler.config
        mu = calculate_shift(
            (latents.shape[2] // 2) * (latents.shape[3] // 2),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(scheduler, steps, self.device,
                                          sigmas=get_default_z_image_sigmas(steps), mu=mu)
        scheduler.set_begin_index(0)
        return timesteps

    # ----- denoise -----------------------------------------------------------------
    def _forward(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: Embeds,
                 states: list[RequestState], guidance: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("Z-Image rows are lists; see denoise")

    def step_guidance(self, state: RequestState) -> float:
        """The guidance scale at the state's current step: 0 once truncated (no negative row)."""
        scale = state.params.guidance_scale if state.uncond is not None else 0.0
        truncation = _or(state.params.cfg_truncation, DEFAULT_CFG_TRUNCATION)
        t_norm = (1000 - float(state.timesteps[state.step])) / 1000
        return 0.0 if truncation <= 1 and t_norm > truncation else scale

    @torch.inference_mode()
    def denoise(self, states: list[RequestState]) -> None:
        """One transformer call: every request's conditional rows, then the negative rows
        of those guided at this step."""
        scales = [self.step_guidance(s) for s in states]
        guided = [s for s, g in zip(states, scales) if g > 0]
        latents, timesteps, captions = [], [], []
        for s, embeds in [(s, s.cond) for s in states] + [(s, s.uncond) for s in guided]:
            latents += list(s.latents.to(self.dtype).unsqueeze(2).unbind(0))
            timesteps.append((1000 - s.timesteps[s.step].expand(s.n)) / 1000)
            captions += list(embeds[CAPTION].unbind(0))  # type: ignore[index]
        out = self.transformer(latents, torch.cat(timesteps), captions, return_dict=False)[0]
        cond_row, uncond_row = 0, sum(s.n for s in states)
        for s, scale in zip(states, scales):
            cond = torch.stack([o.float() for o in out[cond_row:cond_row + s.n]])
            cond_row += s.n
            if scale > 0:
                uncond = torch.stack([o.float() for o in out[uncond_row:uncond_row + s.n]])
                uncond_row += s.n
                noise = self._guide(s, uncond, cond, scale)
            else:
                noise = cond
            t = s.timesteps[s.step]
            s.latents = s.scheduler.step(-noise.squeeze(2).float(), t, s.latents, return_dict=False)[0]
            s.step += 1

    def _guide(self, state: RequestState, uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
        """The pipeline's combination, image by image: ``c + g (c - u)``, its norm capped."""
        cap = _or(state.params.cfg_normalization, DEFAULT_CFG_NORMALIZATION)
        preds = []
        for c, u in zip(cond, uncond):
            pred = c + scale * (c - u)
            if cap > 0.0:
                limit = torch.linalg.vector_norm(c) * cap
                norm = torch.linalg.vector_norm(pred)
                if norm > limit:
                    pred = pred * (limit / norm)
            preds.append(pred)
        return torch.stack(preds)

    def combine_guidance(self, state: RequestState, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self._guide(state, uncond, cond, self.step_guidance(state))

    # ----- decode ------------------------------------------------------------------
    def _latents_to_vae(self, latents: torch.Tensor, params: ImageParams) -> torch.Tensor:
        config = self.pipe.vae.config
        return latents / config.scaling_factor + config.shift_factor


def _rows(caption: torch.Tensor, n: int) -> torch.Tensor:
    return caption[None].expand(n, -1, -1).contiguous()


def _or(value: float | None, default: float) -> float:
    return default if value is None else float(value)
