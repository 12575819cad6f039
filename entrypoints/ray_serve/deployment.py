"""The Serve application: one ``EngineReplica`` per replica, each over a placement group.

Serve owns everything here: it places each replica's bundles (``STRICT_PACK``: one node),
routes requests (power of two choices on queue length), scales between
``min_replicas`` and ``max_replicas`` on ongoing requests, health-checks replicas and
replaces dead ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.serve.config import AutoscalingConfig

from engine.config import EngineConfig
from engine.scheduler.factory import default_max_batch_size_on
from entrypoints.ray_serve import SERVE_LATENCY_MODE
from entrypoints.ray_serve.replica import EngineReplica

APP_NAME = "gfdit"
DEPLOYMENT_NAME = "EngineReplica"


@dataclass(frozen=True)
class ReplicaOptions:
    """How many engine replicas, and what each holds."""

    num_replicas: int | None = 1
    """A fixed number of replicas; None to autoscale between min and max."""
    min_replicas: int = 1
    max_replicas: int = 1
    workers_per_replica: int = 1
    """Engine workers per replica: one placement-group bundle (a GPU, or a CPU) each."""
    gpus_per_worker: float = 0.0
    """1 on GPUs; 0 for CPU workers."""
    cpus_per_worker: float = 1.0
    max_ongoing_requests: int | None = None
    """Requests Serve sends one replica at once; more wait in Serve's queue. None: twice the
    engine's max batch size, enough to keep its batches full, while a burst of requests
    cannot pile onto one replica (Serve's router reads queue lengths it cached, so many
    requests arriving together would otherwise follow the same stale figure)."""
    target_ongoing_requests: float | None = None
    """Autoscaling: ongoing requests per replica that Serve aims for; None: the engine's
    max batch size."""
    health_check_period_s: float = 10.0
    graceful_shutdown_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.workers_per_replica < 1:
            raise ValueError("workers per replica must be >= 1")
        if self.num_replicas is not None and self.num_replicas < 1:
            raise ValueError("replicas must be >= 1")
        if self.num_replicas is None and not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError("need 0 <= min replicas <= max replicas and max replicas >= 1")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < 1:
            raise ValueError("max ongoing requests per replica must be >= 1")

    @property
    def bundles(self) -> list[dict[str, float]]:
        bundle = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker:
            bundle["GPU"] = self.gpus_per_worker
        return [dict(bundle) for _ in range(self.workers_per_replica)]

    def deployment_options(self, max_batch_size: int) -> dict[str, Any]:
        """Serve's options for the deployment; ``max_batch_size``: the engine's, which sizes
        the defaults of the ongoing-request bounds."""
        target = self.target_ongoing_requests or max_batch_size
        scaling: dict[str, Any] = (
            {"num_replicas": self.num_replicas} if self.num_replicas is not None else
            {"autoscaling_config": AutoscalingConfig(
                min_replicas=self.min_replicas, max_replicas=self.max_replicas,
                initial_replicas=max(self.min_replicas, 1),
                target_ongoing_requests=target)})
        return {
            "name": DEPLOYMENT_NAME,
            **scaling,
            # The replica actor takes its resources from the first bundle, and the front
            # end's Serve latency mode (entrypoints/ray_serve/__init__.py).
            "ray_actor_options": {"num_cpus": self.cpus_per_worker, "num_gpus": self.gpus_per_worker,
                                  "runtime_env": {"env_vars": {SERVE_LATENCY_MODE: os.environ[SERVE_LATENCY_MODE]}}},
            "placement_group_bundles": self.bundles,
            "placement_group_strategy": "STRICT_PACK",
            "max_ongoing_requests": self.max_ongoing_requests or 2 * max_batch_size,
            "health_check_period_s": self.health_check_period_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
        }


def replica_engine_options(engine_options: dict[str, Any], options: ReplicaOptions) -> dict[str, Any]:
    """The engine options each replica's AsyncEngine gets: one worker per bundle."""
    replica = {**engine_options, "num_workers": options.workers_per_replica}
    if not options.gpus_per_worker:
        replica.setdefault("device", "cpu")
        if replica.get("worker_threads") is None:
            replica["worker_threads"] = max(1, int(options.cpus_per_worker))
    return replica


def build_app(engine_options: dict[str, Any], options: ReplicaOptions) -> serve.Application:
    replica_options = replica_engine_options(engine_options, options)
    max_batch_size = replica_options.get("max_batch_size") or default_max_batch_size_on(
        "cuda" if options.gpus_per_worker else "cpu")
    deployment = serve.deployment(EngineReplica).options(**options.deployment_options(max_batch_size))
    return deployment.bind(replica_options)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """The replicas as a Serve config deploys them (``import_path:
    entrypoints.ray_serve.deployment:app_builder``, e.g. a KubeRay RayService's
    ``serveConfigV2``): ``args`` = ``{"engine": {engine options}, "replicas": {ReplicaOptions
    fields}}``. Unknown names raise, as on the command line."""
    unknown = set(args) - {"engine", "replicas"}
    if unknown:
        raise ValueError(f"unknown app args {sorted(unknown)}; expected 'engine' and 'replicas'")
    engine_options = dict(args.get("engine") or {})
    EngineConfig.create(**engine_options)  # bad options fail at deploy time, naming the option
    return build_app(engine_options, ReplicaOptions(**(args.get("replicas") or {})))
