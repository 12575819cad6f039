"""``gfdit serve [MODEL]``: the OpenAI-compatible images server until SIGTERM or Ctrl-C.

On SIGTERM (or SIGINT) the server stops listening, answers new requests on open
connections with 503, lets the requests in flight finish for up to ``--drain-timeout``
seconds, aborts the rest (answered 503), stops the engine and exits with status 0.

With ``--ray`` the engine is replicas on Ray Serve (``entrypoints.ray_serve``) behind the
same server; without it Ray is never imported.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from typing import TYPE_CHECKING, Any

from engine.config import DEFAULT_MODEL, add_engine_args, engine_options_from_args

if TYPE_CHECKING:
    from engine.client import EngineClient
    from entrypoints.api_server import ServerConfig

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                        help=f"a preset, a diffusers folder or a hub id (default: {DEFAULT_MODEL})")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 for every interface (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    parser.add_argument("--api-key", default=os.environ.get("GFDIT_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1/ routes (default: $GFDIT_API_KEY)")
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="names clients may pass as model (default: the model's name)")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="most generation requests held at once; more get 429 (default: 256)")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds requests in flight may take to finish on shutdown (default: 30)")
    parser.add_argument("--url-ttl", type=float, default=600.0,
                        help="seconds an image behind a response_format=url link stays (default: 600)")
    parser.add_argument("--no-lora-admin", dest="lora_admin", action="store_false",
                        help="do not serve POST and DELETE /v1/loras (adapters come from --lora only)")
    ray = parser.add_argument_group("replicas on Ray Serve (needs the ray extra: pip install 'gfdit[ray]')")
    ray.add_argument("--ray", action="store_true",
                     help="run the engine as replicas on Ray Serve behind this server (default: one engine here)")
    ray.add_argument("--ray-address", default=None,
                     help="Ray cluster to join: 'auto' (a running cluster), HOST:PORT or ray://...; "
                          "unset: $RAY_ADDRESS, else a cluster started on this machine, else a new local one")
    ray.add_argument("--replicas", type=int, default=None,
                     help="a fixed number of engine replicas (default: 1 unless --min/--max-replicas)")
    ray.add_argument("--min-replicas", type=int, default=None,
                     help="autoscale: fewest replicas (with --max-replicas; default: 1)")
    ray.add_argument("--max-replicas", type=int, default=None,
                     help="autoscale: most replicas; Serve adds replicas as ongoing requests grow")
    ray.add_argument("--workers-per-replica", type=int, default=1,
                     help="engine workers per replica, one placement-group bundle (GPU or CPU) each, "
                          "all on one node (default: 1)")
    ray.add_argument("--max-ongoing-per-replica", type=int, default=None,
                     help="requests Serve sends one replica at once; more wait in Serve's queue "
                          "(default: twice the max batch size)")
    ray.add_argument("--target-ongoing-per-replica", type=float, default=None,
                     help="autoscale: ongoing requests per replica Serve aims for (default: the max batch size)")
    add_engine_args(parser, with_model=False)


def run(args: argparse.Namespace) -> int:
    from entrypoints.api_server import ServerConfig

    config = ServerConfig(
        host=args.host, port=args.port, api_key=args.api_key or None,
        served_model_names=tuple(args.served_model_name or ()), max_queue=args.max_queue,
        drain_timeout_s=args.drain_timeout, url_ttl_s=args.url_ttl, lora_admin=args.lora_admin)
    engine_options = {**engine_options_from_args(args), "model": args.model}
    if not args.ray:
        flags = [f for f, v in (("--ray-address", args.ray_address), ("--replicas", args.replicas),
                                ("--min-replicas", args.min_replicas), ("--max-replicas", args.max_replicas))
                 if v is not None]
        if flags:
            raise SystemExit(f"gfdit serve: {', '.join(flags)} need --ray")
        asyncio.run(serve(engine_options, config))
        return 0
    from entrypoints.cli_serve_ray import serve_on_ray

    return serve_on_ray(args, engine_options, config)


async def serve(engine_options: dict[str, Any], config: ServerConfig, *, replicas: Any = None) -> None:
    """Serve until SIGTERM/SIGINT; ``replicas`` (ReplicaOptions and the Ray address) runs the
    engine as replicas on Ray Serve."""
    from entrypoints.api_server import APIServer

    if replicas is None:
        from engine.async_engine import AsyncEngine

        engine: EngineClient = await AsyncEngine.create(**engine_options)
    else:
        from entrypoints.ray_serve import RayEngineClient

        options, address = replicas
        engine = await RayEngineClient.create(engine_options, options, address=address)
    logger.info("%s", engine.device_summary())
    try:
        server = APIServer(engine, config)
        await server.start()
        # A line for people and for scripts that started us on port 0.
        print(f"gfdit: serving {', '.join(server.model_names)} on {server.url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        logger.info("shutting down: draining requests in flight (up to %g s)", config.drain_timeout_s)
        await server.stop()
    finally:
        await engine.shutdown()
    logger.info("stopped")
