"""The API server as a Serve application, for clusters whose apps Serve deploys from a
config (a KubeRay ``RayService``): one actor runs the same aiohttp ``APIServer`` in front
of a replicas app deployed beside it, listening on its own port (Serve's HTTP proxy is
not used). ``gfdit serve --ray`` is the same server run as a process instead.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from entrypoints.api_server import APIServer, ServerConfig
from entrypoints.ray_serve.client import RayEngineClient
from entrypoints.ray_serve.deployment import APP_NAME


class FrontEnd:
    async def __init__(self, replicas_app: str, server: dict[str, Any]) -> None:
        self.client = await RayEngineClient.attach(replicas_app)
        self.server = APIServer(self.client, ServerConfig(**server))
        await self.server.start()

    def url(self) -> str:
        return self.server.url

    async def check_health(self) -> None:
        unhealthy = await self.client.health(self.server.config.stall_timeout_s)
        if unhealthy is not None:
            raise RuntimeError(unhealthy.message)

    async def __del__(self) -> None:
        await self.server.stop()
        await self.client.shutdown()


def app_builder(args: dict[str, Any]) -> serve.Application:
    """``import_path: entrypoints.ray_serve.frontend:app_builder``; ``args`` = ``{"replicas_app":
    name (default gfdit), "server": {ServerConfig fields: host, port, api_key, max_queue, ...},
    "ray_actor_options": {...}}`` (e.g. a custom resource that pins it to the head node)."""
    unknown = set(args) - {"replicas_app", "server", "ray_actor_options"}
    if unknown:
        raise ValueError(f"unknown app args {sorted(unknown)}; expected replicas_app, server, ray_actor_options")
    server = dict(args.get("server") or {})
    if "served_model_names" in server:
        server["served_model_names"] = tuple(server["served_model_names"])
    ServerConfig(**server)  # unknown or bad fields fail at deploy time
    deployment = serve.deployment(FrontEnd).options(
        name="APIServer", num_replicas=1, ray_actor_options=args.get("ray_actor_options") or {"num_cpus": 0.5})
    return deployment.bind(args.get("replicas_app") or APP_NAME, server)
