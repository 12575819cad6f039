"""``/v1/loras``: load, list and unload LoRA adapters at run time.

``POST /v1/loras {"name", "path"}`` loads an adapter on every worker (the path is inside
``--lora-dir``), ``GET /v1/loras`` lists them, ``DELETE /v1/loras/{name}`` unloads one.
They sit under ``/v1/``, so they need the API key when one is set; ``--no-lora-admin``
leaves only the listing. An adapter a running request uses is never unloaded: the
DELETE is refused with 409 and the request finishes with it.
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from engine.client import EngineClient
from engine.lora_registry import LoraBusyError, LoraPathError
from engine.params import InvalidParamsError
from entrypoints.protocol import APIError


class LoadLoraRequest(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    path: str


class LoraRoutes:
    def __init__(self, engine: EngineClient, admin: bool) -> None:
        self.engine = engine
        self.admin = admin

    def routes(self) -> list[web.RouteDef]:
        if not hasattr(self.engine, "load_lora"):
            # Engines behind a client (Ray replicas) take adapters from --lora at start-up only.
            return []
        routes = [web.get("/v1/loras", self.list)]
        if self.admin:
            routes += [web.post("/v1/loras", self.load), web.delete("/v1/loras/{name}", self.unload)]
        return routes

    async def list(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": self.engine.list_loras()})  # type: ignore[attr-defined]

    async def load(self, request: web.Request) -> web.Response:
        try:
            body = msgspec.json.decode(await request.read(), type=LoadLoraRequest)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise APIError(400, f"the body must be {{\"name\": str, \"path\": str}}: {exc}",
                           code="invalid_value") from None
        try:
            entry = await self.engine.load_lora(body.name, body.path)  # type: ignore[attr-defined]
        except LoraPathError as exc:
            raise APIError(403, str(exc), param="path", code="path_not_allowed") from None
        except InvalidParamsError as exc:
            raise APIError(400, str(exc), param=exc.param, code="invalid_value") from None
        except LoraBusyError as exc:
            raise APIError(409, str(exc), code="lora_in_use") from None
        return web.json_response(entry)

    async def unload(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            await self.engine.unload_lora(name)  # type: ignore[attr-defined]
        except KeyError:
            raise APIError(404, f"no LoRA adapter {name!r} is loaded", code="lora_not_found") from None
        except LoraBusyError as exc:
            raise APIError(409, str(exc), code="lora_in_use") from None
        return web.json_response({"name": name, "deleted": True})
