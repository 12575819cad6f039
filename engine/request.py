"""What a user asks for (ImageParams) and the engine's book-keeping of a request (Request)."""

from __future__ import annotations

import enum
import secrets
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from engine.messages import ModelInfo

OUTPUT_FORMATS = ("png", "jpeg", "webp", "raw")
MAX_SEED = 2**63 - 1


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
    """

    negative_prompt: str | None = None
    n: int = 1
    width: int | None = None
    height: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    # png / jpeg / webp are encoded in the worker; raw is uint8 RGB (the Python API's default).
    # None: png, or raw through the Python API.
    output_format: str | None = None
    output_compression: int | None = None
    # Number of previews of the latents sent while denoising (the API's stream partial_images).
    partial_images: int = 0
    # Attach the final latents (float32) to the output; for tests and research.
    return_latents: bool = False
    # Scheduling hints: higher priority first; deadline in seconds after arrival.
    priority: int = 0
    deadline_s: float | None = None

    def resolve(self, info: ModelInfo, limits: Limits) -> ImageParams:
        """Fill defaults from the model and check every bound; raises InvalidParamsError."""
        width = info.default_width if self.width is None else self.width
        height = info.default_height if self.height is None else self.height
        steps = info.default_steps if self.num_inference_steps is None else self.num_inference_steps
        guidance = info.default_guidance if self.guidance_scale is None else self.guidance_scale
        seed = secrets.randbits(63) if self.seed is None else self.seed
        _check_int("n", self.n, 1, limits.max_n)
        for name, value in (("width", width), ("height", height)):
            _check_int(name, value, info.size_multiple, min(limits.max_size, info.max_size))
            if value % info.size_multiple:
                raise InvalidParamsError(
                    f"{name} must be a multiple of {info.size_multiple} for model {info.name}, got {value}", name)
        _check_int("num_inference_steps", steps, 1, limits.max_steps)
        if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not 0 <= guidance <= 100:
            raise InvalidParamsError(f"guidance_scale must be a number in [0, 100], got {guidance!r}",
                                     "guidance_scale")
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
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise InvalidParamsError("negative_prompt must be a string", "negative_prompt")
        if self.negative_prompt is not None and len(self.negative_prompt) > limits.max_prompt_chars:
            raise InvalidParamsError(
                f"negative_prompt is longer than {limits.max_prompt_chars} characters", "negative_prompt")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise InvalidParamsError("deadline_s must be positive", "deadline_s")
        return msgspec.structs.replace(
            self, width=width, height=height, num_inference_steps=steps,
            guidance_scale=float(guidance), seed=seed, output_format=output_format)


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """Bounds on what one request may ask (engine options)."""

    max_n: int = 10
    max_size: int = 4096
    max_steps: int = 200
    max_prompt_chars: int = 8192


def check_prompt(prompt: object, limits: Limits) -> str:
    if not isinstance(prompt, str):
        raise InvalidParamsError(f"prompt must be a string, got {type(prompt).__name__}", "prompt")
    if not prompt.strip():
        raise InvalidParamsError("prompt must not be empty", "prompt")
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidParamsError(f"prompt is longer than {limits.max_prompt_chars} characters", "prompt")
    return prompt


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidParamsError(f"{name} must be an integer, got {value!r}", name)
    if not low <= value <= high:
        raise InvalidParamsError(f"{name} must be between {low} and {high}, got {value}", name)


class RequestStatus(enum.IntEnum):
    WAITING = 0  # admitted, not yet encoded
    RUNNING = 1  # state lives on a worker (denoising or waiting to decode)
    FINISHED = 2
    ABORTED = 3
    FAILED = 4

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED


class ShapeKey(msgspec.Struct, frozen=True, array_like=True):
    """Requests with equal keys can share a denoise batch."""

    width: int
    height: int
    cfg: bool


class Request:
    """The engine's book-keeping of one request; the tensors live on the workers."""

    def __init__(self, request_id: str, prompt: str, params: ImageParams, shape: ShapeKey,
                 arrival_time: float) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.shape = shape
        self.arrival_time = arrival_time
        self.status = RequestStatus.WAITING
        self.step = 0  # denoise steps done
        self.denoised = False  # all steps done, waiting for the VAE
        self.location: tuple[int, ...] | None = None  # ranks that hold the request's state
        self.task_id: int | None = None  # the task it is in, if any
        self.first_scheduled_time: float | None = None
        self.finished_time: float | None = None
        self.error: str | None = None
        self.retries = 0  # times it started over after losing its worker
        self.deadline = None if params.deadline_s is None else arrival_time + params.deadline_s

    @property
    def num_steps(self) -> int:
        return self.params.num_inference_steps  # type: ignore[return-value]

    @property
    def n(self) -> int:
        return self.params.n

    @property
    def in_flight(self) -> bool:
        return self.task_id is not None

    def __repr__(self) -> str:
        return (f"Request({self.request_id[:8]}, {self.status.name}, step {self.step}/{self.num_steps}, "
                f"at {self.location})")
