"""One engine replica: a Ray Serve deployment that holds one ``AsyncEngine``.

Serve starts it in an actor placed in the first bundle of the replica's placement group
(``STRICT_PACK``: every bundle on one node, one bundle per worker). The engine's worker
processes are the actor's children on that node; on GPUs they get the devices of every
bundle. ``generate`` is a streaming method: Serve carries each yielded ``ReplicaItem``
to the caller, and cancels the method (so the engine aborts the request) when the caller
cancels its stream or goes away.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import serve

from engine.async_engine import AsyncEngine, EngineDeadError
from engine.config import EngineConfig
from engine.messages import ModelInfo
from engine.outputs import RequestAbortedError, RequestFailedError, RequestOutput
from engine.params import ImageParams, InvalidParamsError
from engine.stats import RequestStats, TaskStats

logger = logging.getLogger(__name__)

# Task records kept for the front end between two items; past this the oldest go.
_MAX_PENDING_TASKS = 4096


@dataclass
class ReplicaError:
    """How the engine ended a request, carried as data (the caller re-raises it)."""

    kind: str  # "invalid", "failed", "aborted" or "dead"
    message: str
    param: str | None = None


@dataclass
class ReplicaItem:
    """One item of a replica's stream: an output or an error, plus the replica's task
    records since its previous item (any request's), which feed the front end's metrics."""

    output: RequestOutput | None = None
    error: ReplicaError | None = None
    tasks: list[TaskStats] = field(default_factory=list)


def expose_bundle_gpus() -> None:
    """Let the engine's worker processes see the GPUs of every bundle of this replica's
    placement group, not only the actor's own bundle.

    Ray sets ``CUDA_VISIBLE_DEVICES`` of an actor to its own bundle's GPU. A task with one
    GPU in bundle i is given bundle i's GPU, so one such task per other bundle tells which
    devices the group holds; they are reserved for the group for its whole life.
    """
    own = [str(g) for g in ray.get_gpu_ids()]
    group = ray.util.get_current_placement_group()
    if not own or group is None or len(group.bundle_specs) < 2:
        return
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=0, num_gpus=1)
    def bundle_gpus() -> list[str]:
        return [str(g) for g in ray.get_gpu_ids()]

    refs = [bundle_gpus.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        group, placement_group_bundle_index=i)).remote() for i in range(1, len(group.bundle_specs))]
    devices = own + [g for ids in ray.get(refs) for g in ids]
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    logger.info("replica workers on GPUs %s", os.environ["CUDA_VISIBLE_DEVICES"])


@dataclass(frozen=True)
class ReplicaStatus:
    """What one replica holds now (for operators and tests; Serve routes on its own counts)."""

    replica_id: str
    unfinished: int
    waiting: int
    running: int
    pids: list[int]
    """The replica's process and its engine's workers."""


class EngineReplica:
    """The Serve deployment class (``deployment.build_app`` wraps it in ``serve.deployment``)."""

    async def __init__(self, engine_options: dict[str, Any]) -> None:
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        expose_bundle_gpus()
        self.engine = await AsyncEngine.create(**engine_options)
        self._tasks: list[TaskStats] = []
        self.engine.add_observer(self)
        logger.info("replica %s ready: %s", self.replica_id, self.engine.device_summary())

    # ----- EngineObserver ------------------------------------------------------------
    def on_task(self, stats: TaskStats) -> None:
        self._tasks.append(stats)
        if len(self._tasks) > _MAX_PENDING_TASKS:
            del self._tasks[: len(self._tasks) - _MAX_PENDING_TASKS]

    def on_request(self, stats: RequestStats) -> None:
        """Request ends are counted by the front end, which sees every one."""

    # ----- called through deployment handles -------------------------------------------
    def model_info(self) -> ModelInfo:
        assert self.engine.model_info is not None
        return self.engine.model_info

    def engine_config(self) -> EngineConfig:
        return self.engine.config

    def check_health(self) -> None:
        """Serve calls this periodically; raising makes it replace the replica."""
        if not self.engine.is_running:
            raise RuntimeError(f"replica {self.replica_id}: the engine's workers are not running")

    async def generate(self, prompt: str, params: ImageParams, request_id: str,
                       progress: bool) -> AsyncIterator[ReplicaItem]:
        try:
            stream = self.engine.generate(prompt, params, request_id, progress=progress)
            async with aclosing(stream) as outputs:
                async for out in outputs:
                    out.replica = self.replica_id
                    yield ReplicaItem(output=out, tasks=self._take_tasks())
        except InvalidParamsError as exc:
            yield ReplicaItem(error=ReplicaError("invalid", str(exc), exc.param))
        except RequestFailedError as exc:
            yield ReplicaItem(error=ReplicaError("failed", str(exc)), tasks=self._take_tasks())
        except RequestAbortedError as exc:
            yield ReplicaItem(error=ReplicaError("aborted", str(exc)), tasks=self._take_tasks())
        except EngineDeadError as exc:
            yield ReplicaItem(error=ReplicaError("dead", str(exc)))

    async def generate_final(self, prompt: str, params: ImageParams, request_id: str) -> ReplicaItem:
        """The request's final output alone, for callers that want nothing before it."""
        final = ReplicaItem(error=ReplicaError("dead", "the replica's stream ended without an output"))
        async with aclosing(self.generate(prompt, params, request_id, progress=False)) as items:
            async for item in items:
                final = item
        return final

    def status(self) -> ReplicaStatus:
        load = self.engine.load()
        return ReplicaStatus(self.replica_id, self.engine.num_unfinished, load.waiting, load.running,
                             [os.getpid(), *self.engine.executor.worker_pids().values()])

    def _take_tasks(self) -> list[TaskStats]:
        tasks, self._tasks = self._tasks, []
        return tasks

    async def __del__(self) -> None:
        # Serve calls this when it stops the replica (scale down, redeploy, shutdown).
        await self.engine.shutdown()
