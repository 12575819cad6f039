"""The OpenAI-compatible images HTTP server: an aiohttp app over one engine client.

The engine is an ``EngineClient``: an ``AsyncEngine`` in this process, or a client of
engine replicas on Ray Serve; the server does not tell them apart.

Routes: ``POST /v1/images/generations``, ``GET /v1/models[/{id}]``, ``GET /images/{name}``
(the links of ``response_format="url"``), ``GET /health``, ``GET /metrics``, and
``GET|POST /v1/loras``, ``DELETE /v1/loras/{name}`` (entrypoints/serving_loras.py).

Two middlewares wrap every route. The outer one gives each request a uuid4 id
(``X-Request-Id``, also the engine's request id) and turns every failure into OpenAI's
error shape, including aiohttp's own (404 route, 405 method, 413 body); an unexpected
exception is logged and answered 500 without taking the server down. The inner one
checks the API key on ``/v1/`` routes. aiohttp runs with handler cancellation on, so a
client that disconnects cancels its handler, which aborts its engine request.
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
import uuid
from dataclasses import dataclass

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler

from engine.client import EngineClient
from engine.metrics import CONTENT_TYPE_LATEST, EngineMetrics
from entrypoints.admission import Admission
from entrypoints.image_store import ImageStore
from entrypoints.protocol import APIError, ModelCard, ModelList
from entrypoints.serving_images import REQUEST_ID, ImageGenerations
from entrypoints.serving_loras import LoraRoutes

logger = logging.getLogger(__name__)

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    """When set, /v1/ routes need ``Authorization: Bearer <key>``."""
    served_model_names: tuple[str, ...] = ()
    """Names clients may pass as ``model``; empty: the engine's model name."""
    max_queue: int = 256
    """Most generation requests held at once (waiting or running); more get 429."""
    max_body_bytes: int = 1 << 20
    url_ttl_s: float = 600.0
    """How long an image behind a ``response_format="url"`` link stays."""
    url_store_bytes: int = 1 << 30
    """Memory for those images; the oldest go first."""
    drain_timeout_s: float = 30.0
    """On shutdown, how long requests in flight may take to finish before they are aborted."""
    stall_timeout_s: float = 120.0
    """/health fails when work is pending and no task has finished for this long."""
    lora_admin: bool = True
    """Serve POST and DELETE /v1/loras (loading and unloading adapters at run time)."""


class APIServer:
    def __init__(self, engine: EngineClient, config: ServerConfig) -> None:
        assert engine.model_info is not None, "start the engine first"
        self.engine = engine
        self.config = config
        self.model_names = config.served_model_names or (engine.model_info.name,)
        self.metrics = EngineMetrics(engine)
        self.admission = Admission(config.max_queue)
        self.images = ImageStore(config.url_ttl_s, config.url_store_bytes)
        self.generations = ImageGenerations(engine, self.admission, self.images, self.metrics,
                                            self.model_names, config.max_body_bytes)
        self.created = int(time.time())
        self.app = web.Application(middlewares=[self._errors, self._auth],
                                   client_max_size=config.max_body_bytes)
        self.app.add_routes([
            web.post("/v1/images/generations", self.generations.handle),
            web.get("/v1/models", self._models),
            web.get("/v1/models/{model}", self._model),
            web.get("/images/{name}", self._image),
            web.get("/health", self._health),
            web.get("/metrics", self._metrics),
            *LoraRoutes(engine, config.lora_admin).routes(),
        ])
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None
        self.port = config.port

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    async def start(self) -> None:
        """Listen on host:port (port 0 picks a free one; ``self.port`` tells which)."""
        # Handlers still running when the drain ends only need to write their answer.
        self._runner = web.AppRunner(self.app, handler_cancellation=True, shutdown_timeout=5.0)
        await self._runner.setup()
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.config.host, self.config.port))
        self.port = sock.getsockname()[1]
        self._site = web.SockSite(self._runner, sock)
        await self._site.start()
        logger.info("serving %s on %s", ", ".join(self.model_names), self.url)

    async def stop(self) -> None:
        """Drain: stop listening, refuse new requests (503), let those in flight finish up
        to ``drain_timeout_s``, abort what is left (answered 503), then close. The engine
        belongs to the caller and keeps running."""
        if self._runner is None:
            return
        self.admission.draining = True
        if self._site is not None:
            await self._site.stop()
        if not await self.admission.wait_idle(self.config.drain_timeout_s):
            left = sorted(self.admission.inflight)
            logger.warning("drain timeout: aborting %d request(s) in flight", len(left))
            for request_id in left:
                await self.engine.abort(request_id)
            await self.admission.wait_idle(5.0)
        await self._runner.cleanup()
        self._runner = None

    # ----- middlewares ---------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = uuid.uuid4().hex
        request[REQUEST_ID] = request_id
        try:
            response = await handler(request)
        except APIError as exc:
            response = _error_response(exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = _error_response(APIError(
                exc.status, f"{request.method} {request.path}: {exc.reason}",
                type="invalid_request_error" if exc.status < 500 else "server_error",
                code=_HTTP_CODES.get(exc.status)))
        except Exception:
            logger.exception("request %s (%s %s) failed", request_id, request.method, request.path)
            response = _error_response(APIError(500, "internal server error", type="server_error",
                                                code="internal_error"))
        if not response.prepared:
            response.headers["X-Request-Id"] = request_id
        return response

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        key = self.config.api_key
        if key is not None and request.path.startswith("/v1/"):
            given = request.headers.get("Authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
                raise APIError(401, "missing or incorrect API key (send 'Authorization: Bearer <key>')",
                               code="invalid_api_key")
        return await handler(request)

    # ----- routes --------------------------------------------------------------------
    def _cards(self) -> list[ModelCard]:
        return [ModelCard(id=name, created=self.created, root=self.engine.config.model.model)
                for name in self.model_names]

    async def _models(self, request: web.Request) -> web.Response:
        return _json(ModelList(self._cards()))

    async def _model(self, request: web.Request) -> web.Response:
        for card in self._cards():
            if card.id == request.match_info["model"]:
                return _json(card)
        raise APIError(404, f"model {request.match_info['model']!r} does not exist", param="model",
                       code="model_not_found")

    async def _image(self, request: web.Request) -> web.Response:
        image = self.images.get(request.match_info["name"])
        if image is None:
            raise APIError(404, "no such image (links last "
                                f"{self.config.url_ttl_s:g} s)", code="not_found")
        max_age = max(0, int(image.expires_at - time.monotonic()))
        return web.Response(body=image.data, content_type=image.content_type,
                            headers={"Cache-Control": f"private, max-age={max_age}"})

    async def _health(self, request: web.Request) -> web.Response:
        """200 while the server takes requests, the workers live and the engine makes progress."""
        if self.admission.draining:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        unhealthy = await self.engine.health(self.config.stall_timeout_s)
        if unhealthy is not None:
            raise APIError(503, unhealthy.message, type="server_error", code=unhealthy.code)
        return web.json_response({"status": "ok", "model": self.model_names[0],
                                  "requests": self.engine.num_unfinished})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _json(value: msgspec.Struct) -> web.Response:
    return web.Response(body=msgspec.json.encode(value), content_type="application/json")


def _error_response(exc: APIError) -> web.Response:
    return web.Response(status=exc.status, body=exc.body(), content_type="application/json",
                        headers=exc.headers)
