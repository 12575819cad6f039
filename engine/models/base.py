"""The model adapter contract: a diffusers pipeline split into stages the engine interleaves.

A pipeline's ``__call__`` runs one request from prompt to image in one loop, which makes
batching across requests impossible. An adapter exposes the same math as four stages:

- ``encode``: text encoders for a batch of requests (classifier-free-guidance pairs);
- ``prepare``: a request's initial latents from its own seeded generator, its own
  scheduler instance and timesteps;
- ``denoise``: one transformer call for a batch of requests with equal batch keys, each
  at its own timestep with its own guidance scale, then each request's own ``scheduler.step``;
- ``decode``: the VAE, for a batch of same-shape requests.

What a family decides, it decides here, in methods a subclass overrides: its description
(``info``: latent geometry and guidance rule, engine/model_info.py), how guided
predictions combine (``combine_guidance``), how prompts of different lengths are padded
and masked when a batch's embeddings are concatenated (``concat_embeds``). Its
sequence-parallel processors are named in engine/models/registry.py.

The adapter calls the pipeline's own methods (``encode_prompt``, ``prepare_latents``,
``retrieve_timesteps``, the scheduler's ``step``) so that a request's image equals
``pipeline(prompt, ..., generator=torch.Generator().manual_seed(seed))``.
"""

from __future__ import annotations

import contextlib
import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from diffusers import DiffusionPipeline

from engine.model_info import LatentSpec, ModelInfo
from engine.models.lora import LoraStore, row_loras
from engine.models.registry import FAMILIES
from engine.models.step_cache import CacheEntry, StepCache
from engine.params import ImageParams
from engine.prompt_limit import PromptLimit

Embeds = dict[str, torch.Tensor]


@dataclass
class RequestState:
    """Everything a worker keeps for one request between stages (never leaves the worker)."""

    request_id: str
    params: ImageParams
    latents: torch.Tensor
    cond: Embeds
    uncond: Embeds | None
    scheduler: Any
    timesteps: torch.Tensor
    generator: torch.Generator
    step: int = 0
    step_kwargs: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # The request's step cache (engine/models/step_cache.py): residuals and counters; it
    # moves with the state.
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def cached_steps(self) -> int:
        """Steps so far whose remaining blocks were reused rather than computed."""
        return self.cache.get("cached", 0)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def done(self) -> bool:
        return self.step >= self.num_steps

    @property
    def n(self) -> int:
        return self.latents.shape[0]


class ModelRunner(Protocol):
    """What a worker asks of a model: a DiTAdapter, or the whole-pipeline fallback
    (engine/models/fallback.py), whose states are its own kind."""

    family: str
    name: str
    device: torch.device
    transformer: Any

    def info(self) -> ModelInfo: ...

    def new_states(self, request_ids: list[str], prompts: list[str], params: list[ImageParams]) -> list[Any]: ...

    def denoise(self, states: list[Any]) -> None: ...

    def decode(self, states: list[Any]) -> list[np.ndarray]: ...

    def preview(self, state: Any) -> np.ndarray: ...

    def release(self, state: Any) -> None: ...


class DiTAdapter(ABC):
    """Base class of the per-family adapters; subclasses fill in the family's math."""

    family: ClassVar[str]
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    default_steps: ClassVar[int]
    default_guidance: ClassVar[float]
    # The guidance rule (engine/model_info.py GUIDANCE_RULES): "cfg" doubles the rows of
    # requests with guidance_scale > 1 and combines them with combine_guidance.
    guidance: ClassVar[str] = "cfg"
    # The default true_cfg_scale of a true-CFG family; None: the family ignores it.
    default_true_cfg_scale: ClassVar[float | None] = None
    # Under "cfg", guidance runs for guidance_scale above this (Z-Image: any scale above 0).
    cfg_threshold: ClassVar[float] = 1.0
    # False where the family's denoise does not run its rows through _lora_rows.
    per_request_lora: ClassVar[bool] = True

    def __init__(self, pipe: DiffusionPipeline, name: str, default_size: int | None = None,
                 default_steps: int | None = None) -> None:
        self.pipe = pipe
        self.name = name
        self.transformer = pipe.transformer
        self.device = self.transformer.device
        self.dtype = self.transformer.dtype
        self._default_size = default_size or self._pipeline_default_size()
        self._default_steps = default_steps or self.default_steps
        self.attention_backend = "sdpa"
        self.vae_pixels_per_call = 2**26 if self.device.type == "cuda" else 4 * 256 * 256
        self._info: ModelInfo | None = None
        # Resident LoRA adapters, applied per row inside denoise (engine/models/lora.py).
        self.lora = LoraStore(self.transformer, self.pipeline_class)
        # Per-request first-block caching inside denoise; None where the family has no
        # block stack it fits (``cache_blocks``).
        blocks = self.cache_blocks()
        self.step_cache = (StepCache(blocks[0], blocks[1], narrow_rows=self.lora.narrow)
                           if blocks is not None and len(blocks[0]) >= 2 else None)

    # ----- description -------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    @property
    def patch_size(self) -> int:
        return self.transformer.config.patch_size

    @property
    def num_heads(self) -> int:
        """Attention heads of the transformer (Ulysses splits them over a group)."""
        return self.transformer.config.num_attention_heads

    @abstractmethod
    def _pipeline_default_size(self) -> int: ...

    def cache_blocks(self) -> tuple[list[torch.nn.Module], bool] | None:
        """The blocks step caching wraps, in the order the forward runs them, and whether
        they return ``(encoder_hidden_states, hidden_states)``; None: the family has none
        that fit. The default: a ``transformer_blocks`` stack of dual-stream blocks."""
        blocks = getattr(self.transformer, "transformer_blocks", None)
        return (list(blocks), True) if blocks is not None else None

    def _max_size(self) -> int:
        return 4096

    def latent_spec(self) -> LatentSpec:
        """The latent geometry: the VAE's channels and factor, the transformer's patch."""
        return LatentSpec(channels=self.pipe.vae.config.latent_channels,
                          spatial_compression=self.vae_scale_factor, patch_size=self.patch_size)

    def info(self) -> ModelInfo:
        if self._info is None:
            entry = FAMILIES.get(self.family)
            self._info = ModelInfo(
                name=self.name,
                family=self.family,
                default_width=self._default_size,
                default_height=self._default_size,
                default_steps=self._default_steps,
                default_guidance=self.default_guidance,
                default_true_cfg_scale=self.default_true_cfg_scale,
                latent=self.latent_spec(),
                max_size=self._max_size(),
                num_heads=self.num_heads,
                guidance=self.guidance,
                cfg_threshold=self.cfg_threshold,
                prompt_limit=self.prompt_limit(),
                per_request_lora=self.per_request_lora,
                step_cache=self.step_cache is not None,
                sequence_parallel=entry is not None and entry.sequence_parallel is not None,
                device=str(self.device),
                dtype=str(self.dtype).removeprefix("torch."),
            )
        return self._info

    def prompt_limit(self) -> PromptLimit | None:
        """The text encoder's token limit, for the engine to refuse prompts it would cut."""
        return None

    def cfg(self, params: ImageParams) -> bool:
        """Whether the request runs unconditional rows (the model's one guidance rule)."""
        return self.info().guided(params)

    def rows(self, params: ImageParams) -> int:
        """Transformer rows the request adds to a denoise call."""
        return params.n * self.info().rows_per_image(params)

    # ----- encode ------------------------------------------------------------------
    @abstractmethod
    def _encode_batch(self, prompts: list[str], negatives: list[str] | None) -> tuple[Embeds, Embeds | None]:
        """Run the pipeline's encode_prompt on a batch (one row per prompt)."""

    @torch.inference_mode()
    def encode(self, prompts: list[str], params: list[ImageParams]) -> list[tuple[Embeds, Embeds | None]]:
        """Encode prompts; rows are repeated n times per request like num_images_per_prompt."""
        results: list[tuple[Embeds, Embeds | None] | None] = [None] * len(prompts)
        for use_cfg in (False, True):
            idx = [i for i, p in enumerate(params) if self.cfg(p) == use_cfg]
            if not idx:
                continue
            negatives = [params[i].negative_prompt or "" for i in idx] if use_cfg else None
            cond, uncond = self._encode_batch([prompts[i] for i in idx], negatives)
            for row, i in enumerate(idx):
                n = params[i].n
                results[i] = (_take_row(cond, row, n), _take_row(uncond, row, n) if uncond else None)
        return results  # type: ignore[return-value]

    # ----- prepare -----------------------------------------------------------------
    @abstractmethod
    def _prepare_latents(self, params: ImageParams, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Initial latents (n rows) from the request's generator, plus per-request extras."""

    @abstractmethod
    def _set_timesteps(self, scheduler: Any, params: ImageParams, latents: torch.Tensor) -> torch.Tensor:
        """Set the request's scheduler up as the pipeline does; returns its timesteps."""

    def new_scheduler(self) -> Any:
        """A scheduler instance of the request's own: diffusers schedulers keep a step index."""
        return copy.deepcopy(self.pipe.scheduler)

    @torch.inference_mode()
    def prepare(self, request_id: str, params: ImageParams, cond: Embeds, uncond: Embeds | None) -> RequestState:
        generator = torch.Generator(device="cpu").manual_seed(params.seed)
        scheduler = self.new_scheduler()
        # Only the initial latents consume the generator, as in the pipelines.
        latents, extra = self._prepare_latents(params, generator)
        timesteps = self._set_timesteps(scheduler, params, latents)
        state = RequestState(request_id, params, latents, cond, uncond, scheduler, timesteps, generator, extra=extra)
        state.step_kwargs = self._step_kwargs(state)
        return state

    def _step_kwargs(self, state: RequestState) -> dict[str, Any]:
        return {}

    def new_states(self, request_ids: list[str], prompts: list[str], params: list[ImageParams]) -> list[RequestState]:
        """The ENCODE stage of a batch of new requests: encode, then prepare each."""
        embeds = self.encode(prompts, params)
        return [self.prepare(rid, p, cond, uncond) for rid, p, (cond, uncond) in zip(request_ids, params, embeds)]

    def release(self, state: RequestState) -> None:  # noqa: B027 - nothing to release by default
        """A state is dropped (decoded, aborted, failed); its tensors go with it."""

    # ----- denoise -----------------------------------------------------------------
    def _timestep_rows(self, state: RequestState) -> torch.Tensor:
        return state.timesteps[state.step].expand(state.n)

    def _model_input(self, state: RequestState) -> torch.Tensor:
        return state.latents

    @abstractmethod
    def _forward(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: Embeds,
                 states: list[RequestState], guidance: torch.Tensor) -> torch.Tensor:
        """One transformer call over the batch; returns the noise prediction."""

    def _postprocess_noise(self, noise: torch.Tensor) -> torch.Tensor:
        return noise

    @torch.inference_mode()
    def denoise(self, states: list[RequestState]) -> None:
        """Advance every state by one step with one transformer call.

        All states share a latent shape and CFG mode (the scheduler batches by that key);
        each brings its own timestep, guidance scale and scheduler.
        """
        use_cfg = states[0].uncond is not None
        latents = torch.cat([self._model_input(s) for s in states])
        timesteps = torch.cat([self._timestep_rows(s) for s in states])
        guidance = torch.cat([
            torch.full((s.n,), s.params.guidance_scale, dtype=torch.float32, device=self.device) for s in states
        ])
        embeds = self.concat_embeds([s.cond for s in states])
        if use_cfg:
            embeds = self.concat_embeds([self.concat_embeds([s.uncond for s in states]), embeds])  # type: ignore[misc]
            latents = torch.cat([latents, latents])
            timesteps = torch.cat([timesteps, timesteps])
            guidance = torch.cat([guidance, guidance])
        with self._lora_rows(states, use_cfg), self._cached(states, use_cfg, latents.shape[0]):
            noise = self._postprocess_noise(self._forward(latents, timesteps, embeds, states, guidance))
        if use_cfg:
            uncond_noise, cond_noise = noise.chunk(2)
        row = 0
        for s in states:
            rows = slice(row, row + s.n)
            row += s.n
            if use_cfg:
                noise_i = self.combine_guidance(s, uncond_noise[rows], cond_noise[rows])
            else:
                noise_i = noise[rows]
            t = s.timesteps[s.step]
            s.latents = s.scheduler.step(noise_i, t, s.latents, **s.step_kwargs, return_dict=False)[0]
            s.step += 1

    def _lora_rows(self, states: list[RequestState], use_cfg: bool) -> contextlib.AbstractContextManager:
        """The call's per-row adapters, or nothing when no request in it names one."""
        groups = [(s.n, s.params.loras) for s in states]
        if not any(refs for _, refs in groups):
            return contextlib.nullcontext()
        return self.lora.rows(row_loras(groups, use_cfg), self.device, self.dtype)

    def _cached(self, states: list[RequestState], use_cfg: bool, total_rows: int) -> contextlib.AbstractContextManager:
        """The call's step cache, or nothing when no request in it asks for one."""
        if self.step_cache is None or not any(s.params.cache is not None for s in states):
            return contextlib.nullcontext()
        return self.step_cache.call(cache_entries(states, use_cfg), total_rows)

    def combine_guidance(self, state: RequestState, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """One request's guided prediction from its unconditional and conditional ones."""
        return uncond + state.params.guidance_scale * (cond - uncond)

    def concat_embeds(self, parts: list[Embeds]) -> Embeds:
        """Concatenate the requests' embeddings along the batch. The default needs equal
        lengths (families that pad every prompt to a fixed length); a family whose prompts
        vary in length pads here and extends its attention mask."""
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    # ----- decode ------------------------------------------------------------------
    @abstractmethod
    def _latents_to_vae(self, latents: torch.Tensor, params: ImageParams) -> torch.Tensor: ...

    @torch.inference_mode()
    def decode(self, states: list[RequestState]) -> list[np.ndarray]:
        """VAE-decode same-shape states; returns one uint8 (n, H, W, 3) array per state."""
        return self._decode_latents([s.latents for s in states], states[0].params)

    def _decode_latents(self, latents_list: list[torch.Tensor], params: ImageParams) -> list[np.ndarray]:
        latents = self._latents_to_vae(torch.cat(latents_list), params)
        vae = self.pipe.vae
        # Large VAE batches fall out of a CPU's caches; split them (a GPU takes them whole).
        per_call = max(1, self.vae_pixels_per_call // (params.width * params.height))
        image = torch.cat([self._vae_decode(chunk.to(vae.dtype)) for chunk in latents.split(per_call)])
        array = self.pipe.image_processor.postprocess(image, output_type="np")
        # The same rounding as diffusers' numpy_to_pil, so pixels equal output_type="pil".
        pixels = (array * 255).round().astype(np.uint8)
        out, row = [], 0
        for lat in latents_list:
            out.append(pixels[row:row + lat.shape[0]])
            row += lat.shape[0]
        return out

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE on a chunk of latents, as the pipeline calls it."""
        return self.pipe.vae.decode(latents, return_dict=False)[0]

    @torch.inference_mode()
    def preview(self, state: RequestState) -> np.ndarray:
        """A partial image of the current latents, decoded at the current step."""
        return self._decode_latents([state.latents], state.params)[0]


def cache_entries(states: list[RequestState], use_cfg: bool) -> list[CacheEntry]:
    """The call's requests with a step cache: their rows (``[uncond..., cond...]`` under CFG,
    so a request's two halves decide together) and whether this step may reuse. The first
    and the last steps are always computed, as is a step after ``max_cached_steps`` cached
    ones in a row, or one with nothing stored yet."""
    entries, offset = [], 0
    half = sum(s.n for s in states)
    for s in states:
        rows = list(range(offset, offset + s.n))
        offset += s.n
        cache = s.params.cache
        if cache is None:
            continue
        if use_cfg:
            rows += [half + r for r in rows]
        candidate = (0 < s.step < s.num_steps - 1 and "first" in s.cache
                     and s.cache.get("run", 0) < cache.max_cached_steps)
        entries.append(CacheEntry(s.cache, rows, cache.threshold, candidate))
    return entries


def _take_row(embeds: Embeds, row: int, n: int) -> Embeds:
    return {k: v[row:row + 1].repeat_interleave(n, dim=0) for k, v in embeds.items()}
