"""``gfdit serve --ray``: the replica flags, checked and turned into ``ReplicaOptions``.

Kept apart from ``cli_serve`` so that a server without ``--ray`` never imports Ray.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from entrypoints.api_server import ServerConfig


def serve_on_ray(args: argparse.Namespace, engine_options: dict[str, Any], config: ServerConfig) -> int:
    try:
        import ray  # noqa: F401
        from ray import serve as _serve  # noqa: F401
    except ImportError:
        raise SystemExit("gfdit serve --ray: Ray Serve is not installed (pip install 'gfdit[ray]', "
                         "or pip install -e '.[ray]' in a checkout)") from None
    from entrypoints.cli_serve import serve
    from entrypoints.ray_serve import ReplicaOptions

    autoscale = args.min_replicas is not None or args.max_replicas is not None
    if autoscale and args.replicas is not None:
        raise SystemExit("gfdit serve: give either --replicas or --min-replicas/--max-replicas, not both")
    device = engine_options.get("device", "auto")
    try:
        options = ReplicaOptions(
            num_replicas=None if autoscale else (args.replicas or 1),
            min_replicas=args.min_replicas if args.min_replicas is not None else 1,
            max_replicas=args.max_replicas if args.max_replicas is not None else max(args.min_replicas or 1, 1),
            workers_per_replica=args.workers_per_replica,
            # "auto" means GPUs when the engine would use them; the replicas then ask Ray for one per worker.
            gpus_per_worker=1.0 if device.startswith("cuda") or (device == "auto" and _cluster_has_gpus(args))
            else 0.0,
            max_ongoing_requests=args.max_ongoing_per_replica,
            target_ongoing_requests=args.target_ongoing_per_replica)
    except ValueError as exc:
        raise SystemExit(f"gfdit serve: {exc}") from None
    if options.gpus_per_worker == 0 and device == "auto":
        engine_options = {**engine_options, "device": "cpu"}
    try:
        asyncio.run(serve(engine_options, config, replicas=(options, args.ray_address)))
    except (TypeError, ValueError) as exc:  # a bad engine option, checked before anything deploys
        raise SystemExit(f"gfdit serve: {exc}") from None
    except RuntimeError as exc:  # Serve could not start the replicas (its message says why)
        raise SystemExit(f"gfdit serve --ray: the replicas did not start: {str(exc).strip().splitlines()[0]}") from None
    return 0


def _cluster_has_gpus(args: argparse.Namespace) -> bool:
    """Whether the Ray cluster has GPUs (joins it first; the client then reuses the connection)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=args.ray_address)
    return ray.cluster_resources().get("GPU", 0) > 0
