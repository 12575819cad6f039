"""``POST /v1/images/generations``: an OpenAI request in, the engine's images out (JSON or SSE).

Everything that can refuse a request (content type, size, schema, model, parameters,
the admission bound) runs before the engine sees it, so bad input costs no GPU time and
always gets a 4xx. Images arrive already encoded by the workers; base64 and the JSON of
large bodies are built on a thread, never on the event loop. The engine's generator is
always closed (``aclosing``): a client that disconnects, whose handler aiohttp cancels or
whose stream write fails, aborts its request and frees its state at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import time
from collections.abc import Iterator
from contextlib import aclosing
from dataclasses import dataclass

import msgspec
from aiohttp import web

from engine.async_engine import EngineDeadError
from engine.client import EngineClient
from engine.metrics import EngineMetrics
from engine.outputs import GeneratedImage, RequestAbortedError, RequestFailedError, RequestOutput
from engine.params import ImageParams, InvalidParamsError, check_prompt
from entrypoints.admission import Admission
from entrypoints.image_store import ImageStore
from entrypoints.protocol import (
    APIError,
    CompletedEvent,
    ImageGenerationRequest,
    ImageObject,
    ImagesResponse,
    PartialImageEvent,
    Usage,
    decode_generation_request,
)

logger = logging.getLogger(__name__)

# The uuid4 the server gives each HTTP request; also its engine request id.
REQUEST_ID = web.RequestKey("request_id", str)
# Names the engine replica that made a (non-streamed) answer, when there are replicas.
REPLICA_HEADER = "X-Gfdit-Replica"
# quality -> fraction of the model's default denoising steps (at least 1 step).
QUALITY_STEPS = {"low": 0.25, "medium": 0.5, "high": 1.0, "auto": 1.0}
_SIZE = re.compile(r"([1-9][0-9]{0,5})x([1-9][0-9]{0,5})")
# The engine's parameter names that the API spells otherwise.
_API_PARAM = {"width": "size", "height": "size"}


def steps_for_quality(quality: str, default_steps: int) -> int:
    return max(1, round(default_steps * QUALITY_STEPS[quality]))


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """``"WIDTHxHEIGHT"``, or ``"auto"`` / None for the model's default size."""
    if size is None or size == "auto":
        return None, None
    found = _SIZE.fullmatch(size)
    if not found:
        raise APIError(400, f"size must be 'auto' or 'WIDTHxHEIGHT' such as '256x256', got {size!r}",
                       param="size", code="invalid_value")
    return int(found.group(1)), int(found.group(2))


@dataclass(frozen=True)
class Job:
    """A validated request: what to ask the engine and how to answer."""

    prompt: str
    params: ImageParams  # resolved: every default filled in
    stream: bool
    response_format: str
    quality: str
    background: str
    usage: Usage

    @property
    def size(self) -> str:
        return f"{self.params.width}x{self.params.height}"


class ImageGenerations:
    def __init__(self, engine: EngineClient, admission: Admission, store: ImageStore,
                 metrics: EngineMetrics, model_names: tuple[str, ...], max_body_bytes: int) -> None:
        self.engine = engine
        self.admission = admission
        self.store = store
        self.metrics = metrics
        self.model_names = model_names
        self.max_body_bytes = max_body_bytes

    async def handle(self, request: web.Request) -> web.StreamResponse:
        request_id = request[REQUEST_ID]
        try:
            self.admission.check_open()
            job = self.job(decode_generation_request(await self._read_json(request)))
            self.admission.admit(request_id)
        except APIError as exc:
            self.metrics.count_refused("queue_full" if exc.status == 429 else "rejected")
            raise
        try:
            if job.stream:
                return await self._stream(request, job, request_id)
            return await self._complete(request, job, request_id)
        finally:
            self.admission.release(request_id)

    # ----- validation ----------------------------------------------------------------
    async def _read_json(self, request: web.Request) -> bytes:
        if request.content_type != "application/json":
            raise APIError(415, f"Content-Type must be application/json, got {request.content_type!r}",
                           code="unsupported_media_type")
        too_large = APIError(413, f"the body is larger than {self.max_body_bytes} bytes", code="request_too_large")
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise too_large
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise too_large from None

    def job(self, req: ImageGenerationRequest) -> Job:
        """Check an API request against the model and the engine's limits; raises APIError."""
        info = self.engine.model_info
        assert info is not None
        if req.model is not None and req.model not in self.model_names:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves "
                                f"{', '.join(self.model_names)}", param="model", code="model_not_found")
        if req.background == "transparent":
            raise APIError(400, f"model {info.name} makes opaque RGB images; background 'transparent' is "
                                "not supported (use 'auto' or 'opaque')", param="background",
                           code="unsupported_value")
        stream = bool(req.stream)
        response_format = req.response_format or "b64_json"
        if stream and response_format == "url":
            raise APIError(400, "a stream carries b64_json images; response_format 'url' needs stream false",
                           param="response_format", code="unsupported_value")
        width, height = parse_size(req.size)
        quality = req.quality or "auto"
        steps = req.num_inference_steps or steps_for_quality(quality, info.default_steps)
        try:
            check_prompt(req.prompt, self.engine.config.limits, info)
            params = self.engine.resolve_params(ImageParams(
                negative_prompt=req.negative_prompt, n=req.n or 1, width=width, height=height,
                num_inference_steps=steps, guidance_scale=req.guidance_scale,
                true_cfg_scale=req.true_cfg_scale, cfg_normalization=req.cfg_normalization,
                cfg_truncation=req.cfg_truncation, seed=req.seed, loras=tuple(req.loras or ()), cache=req.cache,
                output_format=req.output_format or "png", output_compression=req.output_compression,
                # Partial images only make sense in a stream; don't pay for previews otherwise.
                partial_images=(req.partial_images or 0) if stream else 0,
                priority=req.priority or 0, deadline_s=req.deadline_s))
        except InvalidParamsError as exc:
            raise APIError(400, str(exc), param=_API_PARAM.get(exc.param or "", exc.param),
                           code="invalid_value") from None
        except EngineDeadError as exc:
            raise _unavailable(str(exc)) from None
        tokens = info.image_tokens(params.width, params.height) * params.n  # type: ignore[arg-type]
        return Job(req.prompt, params, stream, response_format,
                   "high" if quality == "auto" else quality, "opaque", Usage(tokens, tokens))

    # ----- answers -------------------------------------------------------------------
    async def _complete(self, request: web.Request, job: Job, request_id: str) -> web.Response:
        final: RequestOutput | None = None
        with _engine_errors():
            async with aclosing(self.engine.generate(job.prompt, job.params, request_id,
                                                     progress=False)) as outputs:
                async for out in outputs:
                    final = out
        assert final is not None and final.finished
        created = int(time.time())
        if job.response_format == "url":
            base = f"{request.url.origin()}/images/"
            data = [ImageObject(url=base + self.store.put(image.data, image.format)) for image in final.images]
            body = _encode_response(job, created, data)
        else:
            body = await asyncio.to_thread(_b64_response, job, created, final.images)
        headers = {REPLICA_HEADER: final.replica} if final.replica else None
        return web.Response(body=body, content_type="application/json", headers=headers)

    async def _stream(self, request: web.Request, job: Job, request_id: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Request-Id": request_id})
        await response.prepare(request)
        sent_partials = 0
        try:
            try:
                with _engine_errors():
                    async with aclosing(self.engine.generate(job.prompt, job.params, request_id,
                                                             progress=False)) as outputs:
                        async for out in outputs:
                            if out.previews:
                                chunk = await asyncio.to_thread(_partial_events, job, out.previews, sent_partials)
                                sent_partials += len(out.previews)
                                await response.write(chunk)
                            if out.finished:
                                await response.write(await asyncio.to_thread(_completed_events, job, out.images))
            except APIError as exc:
                # The status line is gone; the SDK raises this event's error.
                await response.write(_sse("error", exc.body()))
            await response.write_eof()
        except ConnectionResetError:
            logger.info("request %s: the client went away; aborted", request_id)
        return response


def _unavailable(message: str) -> APIError:
    return APIError(503, message, type="server_error", code="engine_unavailable")


@contextlib.contextmanager
def _engine_errors() -> Iterator[None]:
    """The engine's ways of ending a request, as API errors."""
    try:
        yield
    except InvalidParamsError as exc:
        # Checks only a replica can make (its resident LoRA adapters) surface here, not at resolve.
        raise APIError(400, str(exc), param=_API_PARAM.get(exc.param or "", exc.param),
                       code="invalid_value") from None
    except RequestFailedError as exc:
        raise APIError(500, f"generation failed: {exc}", type="server_error", code="request_failed") from None
    except RequestAbortedError:
        raise APIError(503, "the server is shutting down; the request was aborted",
                       type="server_error", code="shutting_down") from None
    except EngineDeadError as exc:
        raise _unavailable(str(exc)) from None


def _b64(image: GeneratedImage) -> str:
    return base64.b64encode(image.data).decode("ascii")


def _encode_response(job: Job, created: int, data: list[ImageObject]) -> bytes:
    return msgspec.json.encode(ImagesResponse(
        created=created, data=data, size=job.size, output_format=job.params.output_format or "png",
        quality=job.quality, background=job.background, usage=job.usage))


def _b64_response(job: Job, created: int, images: list[GeneratedImage]) -> bytes:
    return _encode_response(job, created, [ImageObject(b64_json=_b64(image)) for image in images])


def _sse(event: str, data: bytes) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


def _partial_events(job: Job, previews: list[GeneratedImage], sent: int) -> bytes:
    """Previews come one per image at each preview step; the index counts the steps."""
    n = job.params.n
    now = int(time.time())
    return b"".join(_sse("image_generation.partial_image", msgspec.json.encode(PartialImageEvent(
        b64_json=_b64(image), background=job.background, created_at=now,
        output_format=image.format, partial_image_index=(sent + k) // n, quality=job.quality,
        size=job.size))) for k, image in enumerate(previews))


def _completed_events(job: Job, images: list[GeneratedImage]) -> bytes:
    now = int(time.time())
    return b"".join(_sse("image_generation.completed", msgspec.json.encode(CompletedEvent(
        b64_json=_b64(image), background=job.background, created_at=now, output_format=image.format,
        quality=job.quality, size=job.size, usage=job.usage))) for image in images)
