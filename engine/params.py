"""What a user asks for: ImageParams (like vLLM's SamplingParams), its bounds, and its errors.

Pure (msgspec, no torch): the API server, the batch runner and the engine validate with it,
and the resolved copy travels to the workers inside their messages.
"""

from __future__ import annotations

import secrets
from typing import Protocol

import msgspec

OUTPUT_FORMATS = ("png", "jpeg", "webp", "raw")
MAX_SEED = 2**63 - 1
# true_cfg_scale: 1 turns true CFG off; past 100 a prediction is pure extrapolation noise.
TRUE_CFG_RANGE = (1.0, 100.0)


class ModelDefaults(Protocol):
    """What ``ImageParams.resolve`` reads of a model (engine/model_info.py's ModelInfo)."""

    name: str
    default_width: int
    default_height: int
    default_steps: int
    default_guidance: float
    default_true_cfg_scale: float | None
    max_size: int
    previews: bool

    @property
    def size_multiple(self) -> int: ...

    def check_prompt_tokens(self, prompt: str, param: str = "prompt") -> None: ...


# A LoRA scale past this is no longer a fine-tune's strength but an amplified perturbation.
MAX_LORA_SCALE = 10.0


class LoraRef(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One adapter a request runs with: a loaded adapter's name and its strength (the
    weight diffusers' ``set_adapters`` takes)."""

    name: str
    scale: float = 1.0


# Step-cache methods a request may name (engine/models/step_cache.py); "none" turns a
# server default off for one request.
CACHE_METHODS = ("fbcache",)
# A cached step reuses a residual computed at an earlier step; past a few in a row the
# reused residual is stale enough to blur fine detail, so a computed step is forced.
DEFAULT_MAX_CACHED_STEPS = 3
# The threshold of a cache that names none: a middle value of the default model's sweep
# (benchmarks/benchmark_cache.py); other models want their own sweep.
DEFAULT_CACHE_THRESHOLD = 0.3
MAX_CACHED_STEPS = 100


class StepCache(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """First-block step caching for one request (engine/models/step_cache.py).

    At each step every row runs the transformer's first block; when the relative L1
    change of that block's residual since the request's last computed step is under
    ``threshold``, the request reuses the residual of the remaining blocks from that step
    instead of running them. ``max_cached_steps`` bounds how many steps in a row may be
    cached; the first and last steps are always computed. Threshold 0 caches nothing.
    """

    method: str = "fbcache"
    threshold: float = DEFAULT_CACHE_THRESHOLD
    max_cached_steps: int = DEFAULT_MAX_CACHED_STEPS

    @classmethod
    def parse(cls, text: str) -> StepCache | None:
        """``fbcache:THRESHOLD[:MAX_CACHED_STEPS]`` (the ``--cache`` flag), or ``none``."""
        method, _, rest = text.strip().partition(":")
        if method in ("none", "off", ""):
            return None
        threshold, _, bound = rest.partition(":")
        try:
            cache = cls(method=method, threshold=float(threshold) if threshold else DEFAULT_CACHE_THRESHOLD,
                        max_cached_steps=int(bound) if bound else DEFAULT_MAX_CACHED_STEPS)
        except ValueError:
            raise InvalidParamsError(f"cache must be METHOD:THRESHOLD[:MAX_CACHED_STEPS] such as fbcache:0.3, "
                                     f"or none; got {text!r}", "cache") from None
        return check_cache(cache)


class InvalidParamsError(ValueError):
    """A request parameter is out of bounds; ``param`` names it (the API's 400 ``param``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ImageParams(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """How to generate images for one prompt; like vLLM's SamplingParams.

    Fields left as None take the model's defaults when the engine admits the request
    (``resolve``); the resolved copy travels to the workers and back in the output.
    ``seed`` None draws a fresh seed, reported in the output so the image can be remade.
    Which guidance parameter applies is the model's (``ModelInfo.guidance``):
    ``guidance_scale`` for CFG and guidance-embedded families, ``true_cfg_scale`` (with a
    negative prompt, an empty one counts) for true-CFG families; the others ignore it.
    """

    negative_prompt: str | None = None
    n: int = 1
    width: int | None = None
    height: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    # True classifier-free guidance (Qwen-Image): on when > 1 and a negative prompt is
    # given. None: the model's default; families without true CFG ignore it.
    true_cfg_scale: float | None = None
    # Z-Image's CFG options (other families ignore them). cfg_normalization > 0 caps the
    # guided prediction's norm at that multiple of the conditional one's (0: off);
    # cfg_truncation stops guidance once the normalised time passes it (1: never).
    cfg_normalization: float | None = None
    cfg_truncation: float | None = None
    seed: int | None = None
    # png / jpeg / webp are encoded in the worker; raw is uint8 RGB (the Python API's default).
    # None: png, or raw through the Python API.
    output_format: str | None = None
    output_compression: int | None = None
    # Number of previews of the latents sent while denoising (the API's stream partial_images).
    partial_images: int = 0
    # Attach the final latents (float32) to the output; for tests and research.
    return_latents: bool = False
    # LoRA adapters (loaded by name on the engine), applied together; () for the base model.
    loras: tuple[LoraRef, ...] = ()
    # Step caching (StepCache); None: off, or the server's default (--cache) when resolved.
    cache: StepCache | None = None
    # Scheduling hints: higher priority first; deadline in seconds after arrival.
    priority: int = 0
    deadline_s: float | None = None

    def resolve(self, info: ModelDefaults, limits: Limits, default_cache: StepCache | None = None) -> ImageParams:
        """Fill defaults from the model (and ``default_cache``, the server's step cache, when
        the request names none) and check every bound; raises InvalidParamsError.
        A resolved request's ``cache`` is None (off) or a checked StepCache."""
        width = info.default_width if self.width is None else self.width
        height = info.default_height if self.height is None else self.height
        steps = info.default_steps if self.num_inference_steps is None else self.num_inference_steps
        guidance = info.default_guidance if self.guidance_scale is None else self.guidance_scale
        true_cfg = info.default_true_cfg_scale if self.true_cfg_scale is None else self.true_cfg_scale
        seed = secrets.randbits(63) if self.seed is None else self.seed
        _check_int("n", self.n, 1, limits.max_n)
        multiple = info.size_multiple
        for name, value in (("width", width), ("height", height)):
            _check_int(name, value, multiple, min(limits.max_size, info.max_size))
            if value % multiple:
                raise InvalidParamsError(
                    f"{name} must be a multiple of {multiple} for model {info.name}, got {value}", name)
        _check_int("num_inference_steps", steps, 1, limits.max_steps)
        _check_number("guidance_scale", guidance, 0.0, 100.0)
        if true_cfg is not None:
            _check_number("true_cfg_scale", true_cfg, *TRUE_CFG_RANGE)
        if self.cfg_normalization is not None:
            _check_number("cfg_normalization", self.cfg_normalization, 0.0, 100.0)
        if self.cfg_truncation is not None:
            _check_number("cfg_truncation", self.cfg_truncation, 0.0, 1.0)
        _check_int("seed", seed, 0, MAX_SEED)
        output_format = "png" if self.output_format is None else self.output_format
        if output_format not in OUTPUT_FORMATS:
            raise InvalidParamsError(
                f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {self.output_format!r}",
                "output_format")
        if self.output_compression is not None:
            _check_int("output_compression", self.output_compression, 0, 100)
        _check_int("partial_images", self.partial_images, 0, 3)
        if self.partial_images > steps:
            raise InvalidParamsError("partial_images cannot exceed num_inference_steps", "partial_images")
        if self.partial_images and not info.previews:
            raise InvalidParamsError(f"model {info.name} makes no partial images", "partial_images")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise InvalidParamsError("negative_prompt must be a string", "negative_prompt")
        if self.negative_prompt is not None and len(self.negative_prompt) > limits.max_prompt_chars:
            raise InvalidParamsError(
                f"negative_prompt is longer than {limits.max_prompt_chars} characters", "negative_prompt")
        if self.negative_prompt is not None:
            info.check_prompt_tokens(self.negative_prompt, "negative_prompt")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise InvalidParamsError("deadline_s must be positive", "deadline_s")
        loras = _check_loras(self.loras, limits)
        cache = check_cache(default_cache if self.cache is None else self.cache)
        return msgspec.structs.replace(
            self, loras=loras, cache=cache, width=width, height=height, num_inference_steps=steps, guidance_scale=float(guidance),
            true_cfg_scale=None if true_cfg is None else float(true_cfg), seed=seed, output_format=output_format)


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """Bounds on what one request may ask (engine options)."""

    max_n: int = 10
    max_size: int = 4096
    max_steps: int = 200
    max_prompt_chars: int = 8192
    max_loras_per_request: int = 4


def check_prompt(prompt: object, limits: Limits, info: ModelDefaults | None = None) -> str:
    """A usable prompt: a non-empty string within the character bound and, given the
    model, within its text encoder's token limit."""
    if not isinstance(prompt, str):
        raise InvalidParamsError(f"prompt must be a string, got {type(prompt).__name__}", "prompt")
    if not prompt.strip():
        raise InvalidParamsError("prompt must not be empty", "prompt")
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidParamsError(f"prompt is longer than {limits.max_prompt_chars} characters", "prompt")
    if info is not None:
        info.check_prompt_tokens(prompt)
    return prompt


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidParamsError(f"{name} must be an integer, got {value!r}", name)
    if not low <= value <= high:
        raise InvalidParamsError(f"{name} must be between {low} and {high}, got {value}", name)


def _check_number(name: str, value: object, low: float, high: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidParamsError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}", name)


def check_cache_supported(params: ImageParams, info: object) -> None:
    """Refuse a step cache the model cannot run (``ModelInfo.step_cache`` False: Z-Image,
    the whole-pipeline fallback) rather than ignore it."""
    if params.cache is not None and not getattr(info, "step_cache", False):
        raise InvalidParamsError(f"model {getattr(info, 'name', '?')} ({getattr(info, 'family', '?')}) has no "
                                 "per-request step cache; leave cache out", "cache")


def check_cache(cache: object) -> StepCache | None:
    """A request's step cache as a checked StepCache (a dict is accepted), or None when off."""
    if cache is None:
        return None
    if isinstance(cache, dict):
        try:
            cache = msgspec.convert(cache, StepCache)
        except msgspec.ValidationError as exc:
            raise InvalidParamsError(f"cache: {exc}; expected {{\"method\": \"fbcache\", \"threshold\": number}}",
                                     "cache") from None
    if not isinstance(cache, StepCache):
        raise InvalidParamsError("cache must be {\"method\": \"fbcache\", \"threshold\": number} or null", "cache")
    if cache.method == "none":
        return None
    if cache.method not in CACHE_METHODS:
        raise InvalidParamsError(f"cache method must be one of {', '.join(CACHE_METHODS)} or none, "
                                 f"got {cache.method!r}", "cache")
    threshold = cache.threshold
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0.0 <= threshold <= 1.0:
        raise InvalidParamsError(f"cache threshold must be a number in [0, 1], got {threshold!r}", "cache")
    bound = cache.max_cached_steps
    if not isinstance(bound, int) or isinstance(bound, bool) or not 1 <= bound <= MAX_CACHED_STEPS:
        raise InvalidParamsError(f"cache max_cached_steps must be an integer in [1, {MAX_CACHED_STEPS}], "
                                 f"got {bound!r}", "cache")
    return msgspec.structs.replace(cache, threshold=float(threshold))


def _check_loras(loras: object, limits: Limits) -> tuple[LoraRef, ...]:
    """The request's adapters as LoraRefs (dicts are accepted): distinct names, bounded scales."""
    if not isinstance(loras, (list, tuple)):
        raise InvalidParamsError("loras must be a list of {name, scale} objects", "loras")
    if len(loras) > limits.max_loras_per_request:
        raise InvalidParamsError(f"a request may name at most {limits.max_loras_per_request} loras, "
                                 f"got {len(loras)}", "loras")
    refs = []
    for item in loras:
        if isinstance(item, dict):
            unknown = set(item) - {"name", "scale"}
            if unknown or "name" not in item:
                raise InvalidParamsError("each of loras must be {\"name\": str, \"scale\": number}", "loras")
            item = LoraRef(name=item["name"], scale=item.get("scale", 1.0))
        if not isinstance(item, LoraRef) or not isinstance(item.name, str) or not item.name:
            raise InvalidParamsError("each of loras must be {\"name\": str, \"scale\": number}", "loras")
        scale = item.scale
        if (not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale != scale
                or abs(scale) > MAX_LORA_SCALE):
            raise InvalidParamsError(f"lora {item.name!r}: scale must be a number in "
                                     f"[-{MAX_LORA_SCALE:g}, {MAX_LORA_SCALE:g}], got {scale!r}", "loras")
        refs.append(LoraRef(name=item.name, scale=float(scale)))
    if len({r.name for r in refs}) != len(refs):
        raise InvalidParamsError("loras names an adapter twice", "loras")
    return tuple(refs)
