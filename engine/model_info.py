"""What the engine knows of a loaded model, and the rules it derives from it (pure, no torch).

A model adapter describes its family here once: the latent geometry, the guidance rule,
whether steps batch and split. The scheduler, cost model, memory model, simulator and the
API's ``usage`` all read a request's shape and token count from these functions, never
from width and height themselves, so a new family (or a frame axis) changes one place.

- ``LatentSpec.shape(frames, height, width)`` is a request's latent shape per image,
  ``(channels, latent frames, latent height, latent width)``; ``tokens(shape)`` the
  transformer's image tokens for it. Images have one frame.
- ``ModelInfo.guided(params)`` decides whether a request runs guidance with extra rows,
  by the rule ``ModelInfo.guidance`` names (the engine, the adapters and the simulator all
  ask it): ``"cfg"`` on when guidance_scale > 1; ``"true_cfg"`` on when true_cfg_scale > 1
  and a negative prompt is given (an empty string counts); ``"embedded"`` (the scale is
  fed to the transformer) and ``"none"`` never add rows.
- ``ModelInfo.batch_key(params, request_id)``: requests share a denoise call only when
  their keys are equal.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import msgspec

from engine.prompt_limit import PromptLimit

if TYPE_CHECKING:
    from engine.params import ImageParams

GUIDANCE_RULES = ("none", "cfg", "true_cfg", "embedded")
# Rules whose guided requests run an unconditional (negative) row beside each conditional one.
_DOUBLING = frozenset({"cfg", "true_cfg"})


class LatentSpec(msgspec.Struct, frozen=True, kw_only=True):
    """How pixels map to latents and latents to transformer tokens."""

    channels: int
    spatial_compression: int  # the VAE's pixels per latent side
    patch_size: int  # latent cells per token side (FLUX's 2x2 packing counts as 2)
    temporal_compression: int = 1  # frames per latent frame (after the first), video VAEs
    temporal_patch_size: int = 1

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this (pixels per token side)."""
        return self.spatial_compression * self.patch_size

    def shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Latent shape of one image (or video): the first frame, then one per ``temporal_compression``."""
        latent_frames = (frames - 1) // self.temporal_compression + 1
        return (self.channels, latent_frames, height // self.spatial_compression, width // self.spatial_compression)

    def tokens(self, shape: tuple[int, ...]) -> int:
        """Transformer image tokens of one latent of ``shape``."""
        _, frames, height, width = shape
        return max(1, (-(-frames // self.temporal_patch_size)) * (height // self.patch_size)
                   * (width // self.patch_size))

    def image_tokens(self, height: int, width: int, frames: int = 1) -> int:
        return self.tokens(self.shape(frames, height, width))


@dataclasses.dataclass(frozen=True)
class BatchKey:
    """Requests with equal keys may share a denoise call (and a decode).

    ``tokens`` (image tokens per row) and ``adapter`` (a LoRA id: rows with different
    adapters still share a call) are carried for the scheduler but take no part in
    equality. ``solo`` is the request's own id for models whose steps do not batch, so
    such a request equals no other.
    """

    model: str
    latent_shape: tuple[int, ...]
    guidance: str  # the rule in force for this request: "none" when it adds no rows
    cond_len: int = 0  # conditioning tokens concatenated to the image tokens (edit models)
    expert: int = 0  # which transformer runs the step (Wan 2.2's two experts)
    solo: str = ""
    tokens: int = dataclasses.field(default=1, compare=False)
    adapter: str | None = dataclasses.field(default=None, compare=False)

    @property
    def rows_per_image(self) -> int:
        """Transformer rows one image adds to a call: two under CFG or true CFG."""
        return 2 if self.guidance in _DOUBLING else 1

    @property
    def token_rows(self) -> int:
        """Image-token rows one image adds to a call (tokens x rows)."""
        return (self.tokens + self.cond_len) * self.rows_per_image


class ModelInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What the engine needs to know of the loaded model to validate and schedule."""

    name: str
    family: str
    default_width: int
    default_height: int
    default_steps: int
    default_guidance: float
    latent: LatentSpec
    max_size: int
    num_heads: int
    # The guidance rule (GUIDANCE_RULES): which requests add unconditional rows.
    guidance: str
    device: str
    dtype: str
    # None: the family has no true CFG and ignores true_cfg_scale.
    default_true_cfg_scale: float | None = None
    # Whether requests at different steps share denoise calls; False: one request per call.
    step_batching: bool = True
    # Under the "cfg" rule, guidance runs for guidance_scale above this (most pipelines:
    # 1; Z-Image: 0).
    cfg_threshold: float = 1.0
    # The text encoder's token limit, with the tokenizer to count by (None: characters only).
    prompt_limit: PromptLimit | None = None
    # Whether a denoise step may run on several ranks (Ulysses over the heads).
    sequence_parallel: bool = True
    # Whether a request's state may move to other workers between steps.
    state_transfer: bool = True
    # Whether the worker can decode the latents mid-way (partial_images).
    previews: bool = True
    # Whether requests may name LoRA adapters applied to their own rows of a shared call.
    per_request_lora: bool = True
    # Whether requests may ask for step caching (ImageParams.cache) of their own rows.
    step_cache: bool = False
    # How the worker runs requests: "stages" (the adapter's encode/denoise/decode) or
    # "pipeline" (the whole diffusers pipeline per request, stepped through its callback).
    backend: str = "stages"

    @property
    def size_multiple(self) -> int:
        return self.latent.size_multiple

    def image_tokens(self, width: int, height: int, frames: int = 1) -> int:
        return self.latent.image_tokens(height, width, frames)

    def guided(self, params: ImageParams) -> bool:
        """Whether ``params`` run with unconditional rows under this model's guidance rule."""
        if self.guidance == "cfg":
            return params.guidance_scale is not None and params.guidance_scale > self.cfg_threshold
        if self.guidance == "true_cfg":
            scale = params.true_cfg_scale
            return scale is not None and scale > 1.0 and params.negative_prompt is not None
        return False

    def check_prompt_tokens(self, prompt: str, param: str = "prompt") -> None:
        """Refuse a prompt the text encoder would cut (InvalidParamsError naming ``param``)."""
        if self.prompt_limit is not None:
            self.prompt_limit.check(prompt, param, self.name)

    def rows_per_image(self, params: ImageParams) -> int:
        return 2 if self.guided(params) else 1

    def batch_key(self, params: ImageParams, request_id: str = "") -> BatchKey:
        """The key of a resolved request: it shares a denoise call only with equal keys."""
        shape = self.latent.shape(1, params.height, params.width)  # type: ignore[arg-type]
        return BatchKey(
            model=self.name, latent_shape=shape,
            guidance=self.guidance if self.guided(params) else "none",
            solo="" if self.step_batching else request_id, tokens=self.latent.tokens(shape),
            adapter="+".join(sorted(r.name for r in params.loras)) or None)

    def degrees(self, num_workers: int) -> tuple[int, ...]:
        """Sequence-parallel degrees a step may run at: Ulysses splits the heads over the
        group, so a degree must divide them."""
        if not self.sequence_parallel:
            return (1,)
        return tuple(d for d in range(1, num_workers + 1) if self.num_heads % d == 0)
