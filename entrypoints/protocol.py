"""The OpenAI Images API on the wire: request, response, stream event and error types.

Requests are msgspec Structs decoded and validated in one pass: types, ranges and
enumerations are checked by the decoder, and a failure names the field, which becomes the
``param`` of the 400 answer. Unknown fields are refused (as the OpenAI API does) rather
than silently ignored, so a typo in an extension like ``num_inference_steps`` is caught.
Every field but ``prompt`` may also be null, meaning "the default".
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from engine.params import LoraRef, StepCache

Quality = Literal["auto", "low", "medium", "high"]
OutputFormat = Literal["png", "jpeg", "webp"]
Background = Literal["auto", "opaque", "transparent"]

# OpenAI's bounds; the engine's own limits (--max-n, --max-size ...) apply on top.
MAX_N = 10
MAX_PARTIAL_IMAGES = 3
MAX_SEED = 2**63 - 1


class ImageGenerationRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/images/generations``: OpenAI's fields, then gfdit's extensions."""

    prompt: str
    model: str | None = None
    n: Annotated[int, Meta(ge=1, le=MAX_N)] | None = None
    # "WIDTHxHEIGHT" or "auto" (the model's default size).
    size: str | None = None
    quality: Quality | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: OutputFormat | None = None
    output_compression: Annotated[int, Meta(ge=0, le=100)] | None = None
    background: Background | None = None
    user: str | None = None
    stream: bool | None = None
    partial_images: Annotated[int, Meta(ge=0, le=MAX_PARTIAL_IMAGES)] | None = None
    # Extensions.
    negative_prompt: str | None = None
    num_inference_steps: Annotated[int, Meta(ge=1)] | None = None
    guidance_scale: Annotated[float, Meta(ge=0, le=100)] | None = None
    # True CFG (Qwen-Image): on when > 1 with a negative_prompt; other families ignore it.
    true_cfg_scale: Annotated[float, Meta(ge=1, le=100)] | None = None
    # Z-Image's CFG options (see ImageParams); other families ignore them.
    cfg_normalization: Annotated[float, Meta(ge=0, le=100)] | None = None
    cfg_truncation: Annotated[float, Meta(ge=0, le=1)] | None = None
    seed: Annotated[int, Meta(ge=0, le=MAX_SEED)] | None = None
    # LoRA adapters loaded on the server (GET /v1/loras), each with its strength.
    loras: list[LoraRef] | None = None
    # Step caching: {"method": "fbcache", "threshold": 0.3} (or "none" to turn the
    # server's --cache off); checked by the engine, a bad value is a 400 naming cache.
    cache: StepCache | None = None
    # Scheduling hints: higher priority is served first; the images are wanted within
    # deadline_s seconds of arrival (deadline-aware policies use it; others ignore it).
    priority: Annotated[int, Meta(ge=-1000, le=1000)] | None = None
    deadline_s: Annotated[float, Meta(gt=0, le=86400)] | None = None


class ImageObject(msgspec.Struct, omit_defaults=True):
    b64_json: str | None = None
    url: str | None = None


class InputTokensDetails(msgspec.Struct):
    text_tokens: int = 0
    image_tokens: int = 0


class Usage(msgspec.Struct):
    """OpenAI reports tokens; ``output_tokens`` here counts the DiT's image tokens (latent
    patches) over every image. Text tokens are not counted (the tokenizers live in the
    workers), so the input side is 0."""

    output_tokens: int
    total_tokens: int
    input_tokens: int = 0
    input_tokens_details: InputTokensDetails = msgspec.field(default_factory=InputTokensDetails)


class ImagesResponse(msgspec.Struct):
    created: int
    data: list[ImageObject]
    size: str
    output_format: str
    quality: str
    background: str
    usage: Usage


class PartialImageEvent(msgspec.Struct, tag_field="type", tag="image_generation.partial_image"):
    b64_json: str
    background: str
    created_at: int
    output_format: str
    partial_image_index: int
    quality: str
    size: str


class CompletedEvent(msgspec.Struct, tag_field="type", tag="image_generation.completed"):
    b64_json: str
    background: str
    created_at: int
    output_format: str
    quality: str
    size: str
    usage: Usage


class ModelCard(msgspec.Struct):
    id: str
    created: int
    object: str = "model"
    owned_by: str = "gfdit"
    # The model the name serves: a preset, folder or hub id.
    root: str | None = None


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


class ErrorInfo(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct):
    error: ErrorInfo


class APIError(Exception):
    """An answer in OpenAI's error shape; raise it anywhere in a handler."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> bytes:
        return msgspec.json.encode(ErrorResponse(ErrorInfo(self.message, self.type, self.param, self.code)))


_decoder = msgspec.json.Decoder(ImageGenerationRequest)
_PATH = re.compile(r"at `\$\.(\w+)")
_MISSING = re.compile(r"missing required field `(\w+)`")
_UNKNOWN = re.compile(r"unknown field `(\w+)`")


def decode_generation_request(body: bytes) -> ImageGenerationRequest:
    """Decode and validate a request body; raises a 400 APIError naming the bad field."""
    try:
        return _decoder.decode(body)
    except msgspec.ValidationError as exc:
        message = str(exc)
        if found := _MISSING.search(message):
            raise APIError(400, message, param=found.group(1), code="missing_required_parameter") from None
        if found := _UNKNOWN.search(message):
            # Inside an object field (cache), the field is the param; at the top, the unknown name.
            inside = _PATH.search(message)
            raise APIError(400, message, param=(inside or found).group(1), code="unknown_parameter") from None
        found = _PATH.search(message)
        raise APIError(400, message, param=found.group(1) if found else None, code="invalid_value") from None
    except msgspec.DecodeError as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
