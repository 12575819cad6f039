"""``RayEngineClient``: the engine client over engine replicas on Ray Serve.

The API server talks to it as to an ``AsyncEngine``. Each request is one streaming call
through a Serve deployment handle, so Serve picks the replica (power of two choices on
queue length) and queues requests while replicas start. gfdit adds only what a client
must: parameters are resolved here (the seed is drawn before the request leaves, so a
retry remakes the same images), a request whose replica dies is sent again (Serve routes
it to a live replica) up to ``max_retries`` times and then ends with ``EngineDeadError``,
closing the stream cancels the call on the replica (which aborts the engine request),
and request ends and the replicas' task records feed the observers (``/metrics``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import ray
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import RequestCancelledError
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

from engine.async_engine import EngineDeadError
from engine.client import EngineLoad, Unhealthy
from engine.config import EngineConfig
from engine.messages import ModelInfo
from engine.outputs import RequestAbortedError, RequestFailedError, RequestOutput
from engine.params import ImageParams, InvalidParamsError, check_cache_supported, check_prompt
from engine.request import RequestStatus
from engine.stats import EngineObserver, RequestStats, TaskStats, notify_observers
from entrypoints.ray_serve.deployment import APP_NAME, DEPLOYMENT_NAME, ReplicaOptions, build_app
from entrypoints.ray_serve.replica import ReplicaError, ReplicaItem

logger = logging.getLogger(__name__)

# Errors a replica's engine reports that another replica may not have: send it again.
_RETRYABLE = ("dead", "aborted")


class ReplicaLost(Exception):
    """The replica serving a request went away (its actor died, or it shut down)."""


@dataclass
class _InFlight:
    arrival: float
    call: DeploymentResponse | DeploymentResponseGenerator | None = None
    replica: str | None = None
    started: bool = False
    aborted: bool = False


class RayEngineClient:
    """An engine client whose engines are Serve replicas (``EngineReplica``)."""

    def __init__(self, config: EngineConfig, options: ReplicaOptions | None, handle: DeploymentHandle,
                 model_info: ModelInfo, *, app_name: str, owns_ray: bool, owns_app: bool = True) -> None:
        """``options``: how the replicas were deployed (None: by someone else); ``owns_ray`` /
        ``owns_app``: whether shutting down stops Ray / deletes the replicas."""
        self.config = config
        self.options = options
        self.model_info: ModelInfo | None = model_info
        self.app_name = app_name
        self._handle = handle
        self._owns_ray = owns_ray
        self._owns_app = owns_app
        self._closed = False
        self._inflight: dict[str, _InFlight] = {}
        self._observers: list[EngineObserver] = []
        self.replica_outcomes: Counter[tuple[str, str]] = Counter()
        self.replica_retries = 0

    @classmethod
    async def create(cls, engine_options: dict[str, Any], options: ReplicaOptions, *,
                     address: str | None = None, ray_init: dict[str, Any] | None = None,
                     app_name: str = APP_NAME) -> RayEngineClient:
        """Connect to Ray (``address``: None is Ray's default, "auto" an existing cluster,
        "local" a new one here; ``ray_init``: more ``ray.init`` keywords), deploy the
        replicas and wait until they serve."""
        config = EngineConfig.create(**engine_options)  # bad options fail here, not in a replica
        owns_ray = not ray.is_initialized()
        if owns_ray:
            await asyncio.to_thread(ray.init, address=address, **(ray_init or {}))
        try:
            # No Serve HTTP proxy: gfdit's own API server is the front end.
            await asyncio.to_thread(serve.start, proxy_location="Disabled")
            handle = await asyncio.to_thread(serve.run, build_app(engine_options, options), name=app_name,
                                             route_prefix=None)
            info = await handle.model_info.remote()
        except BaseException:
            await asyncio.to_thread(_teardown, app_name, owns_ray)
            raise
        logger.info("%s on Ray Serve: %s", info.name, _describe(options))
        return cls(config, options, handle, info, app_name=app_name, owns_ray=owns_ray)

    @classmethod
    async def attach(cls, app_name: str = APP_NAME, *, address: str | None = None) -> RayEngineClient:
        """A client of replicas someone else deployed (a Serve config, a KubeRay RayService):
        the engine's config and model come from a replica; shutting down leaves them running."""
        if not ray.is_initialized():
            await asyncio.to_thread(ray.init, address=address)
        handle = await asyncio.to_thread(serve.get_app_handle, app_name)
        config = await handle.engine_config.remote()
        info = await handle.model_info.remote()
        return cls(config, None, handle, info, app_name=app_name, owns_ray=False, owns_app=False)

    # ----- EngineClient --------------------------------------------------------------
    @property
    def num_unfinished(self) -> int:
        return len(self._inflight)

    def resolve_params(self, params: ImageParams | None) -> ImageParams:
        if self.model_info is None:
            raise EngineDeadError("the engine client is shut down")
        default = self.config.model.step_cache if self.model_info.step_cache else None
        resolved = (params or ImageParams()).resolve(self.model_info, self.config.limits, default)
        check_cache_supported(resolved, self.model_info)
        return resolved

    async def generate(self, prompt: str, params: ImageParams | None = None, request_id: str | None = None, *,
                       progress: bool = True) -> AsyncIterator[RequestOutput]:
        if self._closed:
            raise EngineDeadError("the engine client is shut down")
        params = self.resolve_params(params)
        check_prompt(prompt, self.config.limits, self.model_info)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._inflight:
            raise InvalidParamsError(f"request id {request_id!r} is already in use", "request_id")
        record = self._inflight[request_id] = _InFlight(time.monotonic())
        status, final = RequestStatus.ABORTED, None
        delivered_step = delivered_previews = 0
        try:
            for attempt in range(1 + self.config.scheduler.max_retries):
                if attempt:
                    self.replica_retries += 1
                seen_previews = 0  # a retry starts over: pass over what the caller already has
                try:
                    async with aclosing(self._attempt(request_id, prompt, params, progress, record)) as outputs:
                        async for out in outputs:
                            fresh = out.previews[max(0, delivered_previews - seen_previews):]
                            seen_previews += len(out.previews)
                            if not (out.finished or fresh or out.step > delivered_step):
                                continue
                            out.previews = fresh
                            delivered_previews += len(fresh)
                            delivered_step = max(delivered_step, out.step)
                            if out.finished:
                                status, final = RequestStatus.FINISHED, out
                            yield out
                            if out.finished:
                                return
                except ReplicaLost as exc:
                    logger.warning("request %s: %s (attempt %d)", request_id, exc, attempt + 1)
                    if record.replica:
                        self.replica_outcomes[record.replica, "lost"] += 1
                    continue
            status = RequestStatus.FAILED
            raise EngineDeadError(f"request {request_id}: the replica serving it went away "
                                  f"{1 + self.config.scheduler.max_retries} time(s)")
        except RequestFailedError:
            status = RequestStatus.FAILED
            raise
        finally:
            if record.call is not None and status != RequestStatus.FINISHED:
                record.call.cancel()
            del self._inflight[request_id]
            self._observe_request(request_id, record, status, final)

    async def _attempt(self, request_id: str, prompt: str, params: ImageParams, progress: bool,
                       record: _InFlight) -> AsyncIterator[RequestOutput]:
        """One call to whichever replica Serve picks; ReplicaLost if it goes away. A request
        with nothing to report before its images is one unary call (cheaper through Serve
        than a stream); otherwise a stream of outputs."""
        record.replica, record.started = None, False
        try:
            if not progress and not params.partial_images:
                record.call = self._handle.generate_final.remote(prompt, params, request_id)
                yield self._unpack(request_id, await record.call, record)
                return
            record.call = self._handle.options(stream=True).generate.remote(prompt, params, request_id, progress)
            async for item in record.call:
                out = self._unpack(request_id, item, record)
                yield out
                if out.finished:
                    return
        except RayActorError as exc:
            raise ReplicaLost(f"replica {record.replica or '?'} died: {type(exc).__name__}") from None
        except (RequestCancelledError, asyncio.CancelledError):
            if record.aborted:
                raise RequestAbortedError(request_id) from None
            raise
        raise ReplicaLost(f"replica {record.replica or '?'} ended the stream early")

    def _unpack(self, request_id: str, item: ReplicaItem, record: _InFlight) -> RequestOutput:
        self._report_tasks(item.tasks)
        if item.error is not None:
            _raise(request_id, item.error)
        out = item.output
        assert out is not None
        record.replica, record.started = out.replica, True
        return out

    async def abort(self, request_id: str) -> None:
        record = self._inflight.get(request_id)
        if record is not None and record.call is not None:
            record.aborted = True
            record.call.cancel()

    def load(self) -> EngineLoad:
        started = sum(r.started for r in self._inflight.values())
        return EngineLoad(len(self._inflight) - started, started)

    async def health(self, stall_timeout_s: float) -> Unhealthy | None:
        """Serve replaces stalled or dead replicas itself; the front end is healthy while
        at least one replica runs."""
        if self._closed:
            return Unhealthy("engine_unavailable", "the engine client is shut down")
        states = await asyncio.to_thread(self.replica_states)
        if not states.get("RUNNING"):
            return Unhealthy("engine_unavailable", f"no engine replica is running (replicas: {states or 'none'})")
        return None

    def replica_states(self) -> dict[str, int]:
        """Replicas by state (RUNNING, STARTING, ...), as Serve's controller reports them."""
        app = serve.status().applications.get(self.app_name)
        if app is None or DEPLOYMENT_NAME not in app.deployments:
            return {}
        return {str(k): v for k, v in app.deployments[DEPLOYMENT_NAME].replica_states.items()}

    def add_observer(self, observer: EngineObserver) -> None:
        self._observers.append(observer)

    def metric_collectors(self) -> list[Collector]:
        return [ReplicaCollector(self)]

    def device_summary(self) -> str:
        return f"engine replicas on Ray Serve: {_describe(self.options)}"

    async def shutdown(self) -> None:
        """Abort what is left, delete the replicas, and stop Ray if this client started it."""
        if self._closed:
            return
        self._closed = True
        for request_id in list(self._inflight):
            await self.abort(request_id)
        if self._owns_app:
            await asyncio.to_thread(_teardown, self.app_name, self._owns_ray)
        self.model_info = None

    # ----- observers -----------------------------------------------------------------
    def running_by_replica(self) -> Counter[str]:
        return Counter(r.replica for r in self._inflight.values() if r.replica is not None)

    def _report_tasks(self, tasks: list[TaskStats]) -> None:
        for stats in tasks:
            self._notify(lambda observer, s=stats: observer.on_task(s))

    def _observe_request(self, request_id: str, record: _InFlight, status: RequestStatus,
                         final: RequestOutput | None) -> None:
        if record.replica is not None:
            self.replica_outcomes[record.replica, status.name.lower()] += 1
        queue_wait = final.metrics.queue_time if final is not None and final.metrics is not None else None
        stats = RequestStats(request_id, status, len(final.images) if final is not None else 0,
                             time.monotonic() - record.arrival, queue_wait)
        self._notify(lambda observer: observer.on_request(stats))

    def _notify(self, call: Callable[[EngineObserver], None]) -> None:
        notify_observers(self._observers, call)


class ReplicaCollector(Collector):
    """Which replica served what: request ends and requests running, by replica."""

    def __init__(self, client: RayEngineClient) -> None:
        self.client = client

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        ends = CounterMetricFamily("gfdit_replica_requests", "Requests by the replica that served them and how "
                                   "they ended there (lost: the replica went away).", labels=["replica", "outcome"])
        for (replica, outcome), count in sorted(self.client.replica_outcomes.items()):
            ends.add_metric([replica, outcome], count)
        yield ends
        running = GaugeMetricFamily("gfdit_replica_running_requests", "Requests a replica has started and not "
                                    "ended.", labels=["replica"])
        for replica, count in sorted(self.client.running_by_replica().items()):
            running.add_metric([replica], count)
        yield running
        yield CounterMetricFamily("gfdit_replica_retries", "Requests sent again after their replica went away.",
                                  value=self.client.replica_retries)


def _raise(request_id: str, error: ReplicaError) -> None:
    if error.kind == "invalid":
        raise InvalidParamsError(error.message, error.param)
    if error.kind == "failed":
        raise RequestFailedError(request_id, error.message)
    assert error.kind in _RETRYABLE
    raise ReplicaLost(f"the replica's engine ended it: {error.message}")


def _describe(options: ReplicaOptions | None) -> str:
    if options is None:
        return "replicas deployed by the cluster's Serve config"
    count = (f"{options.num_replicas} replica(s)" if options.num_replicas is not None
             else f"{options.min_replicas}-{options.max_replicas} replicas (autoscaling)")
    device = "GPU" if options.gpus_per_worker else "CPU"
    return f"{count} of {options.workers_per_replica} {device} worker(s)"


def _teardown(app_name: str, owns_ray: bool) -> None:
    if not ray.is_initialized():
        return
    try:
        serve.delete(app_name)
    finally:
        if owns_ray:
            serve.shutdown()
            ray.shutdown()
