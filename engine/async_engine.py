"""The asyncio engine: requests in, progress and images out, over one scheduler and executor.

Nothing here blocks the event loop. The engine is event-driven: a new request, an abort
or a task result changes the scheduler's book and schedules one ``_dispatch`` on the
loop (several events in one loop iteration share it), which asks the scheduler for
tasks and hands them to the executor. Results come back through a callback on the loop.
Each request has a queue of outputs that its ``generate()`` generator drains.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.client import EngineLoad, Unhealthy
from engine.config import EngineConfig
from engine.device_monitor import DeviceMonitor
from engine.errors import EngineDeadError
from engine.executor.base import Executor
from engine.lora_admin import LoraAdmin
from engine.lora_registry import LoraBusyError, LoraRegistry
from engine.messages import ModelInfo, Stage, Task, TaskResult
from engine.models.sources import check_model_source
from engine.outputs import (
    GeneratedImage,
    RequestAbortedError,
    RequestFailedError,
    RequestMetrics,
    RequestOutput,
)
from engine.params import ImageParams, InvalidParamsError, check_cache_supported, check_prompt
from engine.request import Request, RequestStatus
from engine.scheduler.factory import load_cost_model, make_scheduler
from engine.scheduler.scheduler import RequestUpdate, Scheduler, UpdateKind
from engine.stats import EngineObserver, RequestStats, TaskStats, notify_observers
from engine.telemetry import Source

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)


_ENDS = (UpdateKind.FINISHED, UpdateKind.FAILED, UpdateKind.ABORTED)


def make_executor(config: EngineConfig) -> Executor:
    """auto and multiprocess: one worker process per device; inprocess: a thread (one worker)."""
    kind = config.parallel.executor
    if kind in ("auto", "multiprocess"):
        from engine.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor(config)
    if kind == "inprocess":
        if (config.parallel.num_workers or 1) != 1:
            raise ValueError("the inprocess executor runs exactly one worker; use executor=multiprocess")
        from engine.executor.inprocess import InProcessExecutor

        return InProcessExecutor(config)
    raise ValueError(f"unknown executor {kind!r}; choose auto, multiprocess or inprocess")


class AsyncEngine(LoraAdmin):
    """Serve image requests from one model; embed it in any asyncio application.

    >>> engine = await AsyncEngine.create(model="tiny-pixart")
    >>> async for out in engine.generate("a red fox", ImageParams(seed=1)):
    ...     print(out.step, out.num_steps, out.finished)
    >>> await engine.shutdown()
    """

    def __init__(self, config: EngineConfig, executor: Executor | None = None, *,
                 telemetry_source: Source | None = None) -> None:
        """``telemetry_source``: read GPU telemetry from it (a FakeSource, say) instead of NVML."""
        self.config = config
        self.executor = executor or make_executor(config)
        self.devices = DeviceMonitor(config.telemetry.telemetry_period_s, source=telemetry_source,
                                     detect_foreign=config.telemetry.detect_foreign_processes)
        self.model_info: ModelInfo | None = None
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._dispatch_pending = False
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        self.last_progress_time = time.monotonic()
        self._observers: list[EngineObserver] = []
        # task id -> (task, images in it, predicted activation bytes), kept only while someone observes.
        self._observed_tasks: dict[int, tuple[Task, int, int | None]] = {}
        self.loras = LoraRegistry(config.lora.lora_dir, config.lora.max_loras)
        self._lora_lock = asyncio.Lock()

    @classmethod
    async def create(cls, config: EngineConfig | None = None, *, telemetry_source: Source | None = None,
                     **options: Any) -> AsyncEngine:
        """Build and start an engine from a config or flat options (``model=``, ``max_batch_size=`` ...)."""
        engine = cls(config or EngineConfig.create(**options), telemetry_source=telemetry_source)
        await engine.start()
        return engine

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # A model that names nothing loadable fails here, in one line, before any worker starts.
        await self._loop.run_in_executor(None, check_model_source, self.config.model.model)
        startup = [LoraRegistry.parse_startup(spec) for spec in self.config.lora.lora]
        info = await self.executor.start(self._on_result, self._on_worker_failed, self._on_worker_restarted)
        try:
            self.scheduler = self._make_scheduler(info)
            self.model_info = info
            for name, path in startup:
                await self.load_lora(name, path)
        except (ValueError, LoraBusyError):
            self.model_info = None
            await self.executor.shutdown()
            raise
        try:
            await self.devices.start(device=self.config.model.device, model_device=info.device,
                                     num_ranks=self.executor.num_workers, our_pids=self._our_pids,
                                     on_sample=self._on_telemetry)
        except BaseException:
            self.model_info = None
            await self.executor.shutdown()  # no worker outlives a failed start
            raise
        if info.backend == "pipeline":
            logger.warning("model %s runs through the whole-pipeline fallback (no native adapter, or "
                           "--backend diffusers): one request per pipeline call, no step batching, no sequence "
                           "parallelism", info.name)
        logger.info("engine ready: %s on %d worker(s), policy %s", self.model_info.name,
                    self.executor.num_workers, self.scheduler.policy.name)

    def _our_pids(self) -> list[int]:
        """Our processes, for the telemetry thread: on a GPU, any other process is foreign."""
        return [*self.executor.worker_pids().values(), os.getpid()]

    def _make_scheduler(self, info: ModelInfo) -> Scheduler:
        sched = self.config.scheduler
        return make_scheduler(info, sched, self.executor.num_workers,
                              cost_model=load_cost_model(sched.profile, info))

    # ----- public API --------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self.model_info is not None and not self._closed and self.executor.healthy

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    def resolve_params(self, params: ImageParams | None) -> ImageParams:
        """Fill the model's defaults in and validate; raises InvalidParamsError."""
        if self.model_info is None:
            raise EngineDeadError("the engine is not started")
        # The server's --cache applies where the model has a step cache; elsewhere it is off.
        default = self.config.model.step_cache if self.model_info.step_cache else None
        resolved = (params or ImageParams()).resolve(self.model_info, self.config.limits, default)
        if resolved.loras and not self.model_info.per_request_lora:
            raise InvalidParamsError(f"model {self.model_info.name} ({self.model_info.family}) does not "
                                     "take per-request LoRA adapters", "loras")
        check_cache_supported(resolved, self.model_info)
        self.loras.check_known(resolved.loras)
        return resolved

    async def generate(self, prompt: str, params: ImageParams | None = None,
                       request_id: str | None = None, *, progress: bool = True) -> AsyncIterator[RequestOutput]:
        """Yield progress outputs (step i of N), then the final output with the images.
        With ``progress`` False, only progress outputs that carry previews are yielded.

        Raises InvalidParamsError for bad input (before anything runs), RequestFailedError
        if the request fails, RequestAbortedError if it is aborted. Closing or cancelling
        the generator aborts the request and frees its state.
        """
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        params = self.resolve_params(params)
        check_prompt(prompt, self.config.limits, self.model_info)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise InvalidParamsError(f"request id {request_id!r} is already in use", "request_id")
        self.loras.acquire(request_id, params.loras)
        key = self.model_info.batch_key(params, request_id)  # type: ignore[union-attr]
        request = Request(request_id, prompt, params, key, time.monotonic())
        stream: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = stream
        self._idle.clear()
        self.scheduler.add_request(request)
        self._kick()
        done = False
        try:
            while True:
                out = await stream.get()
                if isinstance(out, BaseException):
                    done = True
                    raise out
                done = out.finished
                if done or progress or out.previews:
                    yield out
                if done:
                    return
        finally:
            if not done:
                self._abort(request_id)
            self.loras.release(request_id)

    def load(self) -> EngineLoad:
        return EngineLoad(self.scheduler.num_waiting, self.scheduler.num_running)

    async def health(self, stall_timeout_s: float) -> Unhealthy | None:
        """None while the workers live and, with work pending, some task has finished within
        ``stall_timeout_s``."""
        if not self.is_running:
            return Unhealthy("engine_unavailable", "the engine's workers are not running")
        pending = [r.arrival_time for r in self.scheduler.requests.values()]
        if pending:
            # Progress is judged from the later of the last result and the oldest request's
            # arrival, so an engine that was idle for a while is not called stalled.
            quiet = time.monotonic() - max(self.last_progress_time, min(pending))
            if quiet > stall_timeout_s:
                return Unhealthy("engine_stalled", f"the engine has made no progress for {quiet:.0f} s "
                                                   f"with {len(pending)} request(s) pending")
        return None

    def metric_collectors(self) -> list[Collector]:
        from engine.metrics import local_collectors

        return local_collectors(lambda: self.scheduler.admission_cuts, self.devices)

    def device_summary(self) -> str:
        """One line on the GPUs the engine sees (or why it sees none), for start-up logs."""
        return self.devices.summary()

    def add_observer(self, observer: EngineObserver) -> None:
        """Report every finished task and ended request to ``observer`` (e.g. metrics)."""
        self._observers.append(observer)

    async def abort(self, request_id: str) -> None:
        self._abort(request_id)

    async def wait_until_idle(self, timeout: float | None = None) -> bool:
        """Wait until no request is unfinished; False if the timeout came first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def shutdown(self) -> None:
        """Abort what is left, stop the workers. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for request_id in list(self._streams):
            request = self.scheduler.requests.get(request_id)
            if request is not None:
                self._observe_request(request, RequestStatus.ABORTED)
            self._end_stream(request_id, RequestAbortedError(request_id, "the engine is shutting down"))
        if self.model_info is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.devices.stop)
            await self.executor.shutdown()

    # ----- internals ---------------------------------------------------------------
    def _kick(self) -> None:
        if not self._dispatch_pending and not self._closed:
            self._dispatch_pending = True
            self._loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_pending = False
        if self._closed:
            return
        self.scheduler.devices = self.devices.state()
        out = self.scheduler.schedule(time.monotonic())
        for rank, request_ids in out.frees:
            self.executor.free(rank, request_ids)
        for task in out.tasks:
            if self._observers:
                images = sum(self.scheduler.requests[rid].n for rid in task.request_ids)
                self._observed_tasks[task.task_id] = (task, images, self.scheduler.predict_activation(task))
            self.executor.submit(task)

    def _on_telemetry(self) -> None:
        """A new snapshot: held work may fit now (memory freed, a foreign job gone)."""
        if self._streams:
            self._kick()

    def _abort(self, request_id: str) -> None:
        update = self.scheduler.abort_request(request_id, time.monotonic())
        if update is not None:
            self._publish([update])
        self._kick()

    def _on_result(self, result: TaskResult) -> None:
        self.last_progress_time = time.monotonic()
        if self._observers:
            self._observe_task(result)
        self._publish(self.scheduler.on_result(result, self.last_progress_time))
        self._kick()

    def _on_worker_failed(self, rank: int, message: str) -> None:
        logger.error("worker %d failed: %s", rank, message)
        self._observed_tasks = {tid: rec for tid, rec in self._observed_tasks.items()
                                if rank not in rec[0].members}
        self._publish(self.scheduler.on_worker_failed(rank, message, time.monotonic()))
        if not self.executor.healthy and not self._closed:
            # The executor gave up on a worker: nothing can be served any more.
            for request_id in list(self._streams):
                self.scheduler.abort_request(request_id, time.monotonic())
                self._end_stream(request_id, RequestFailedError(request_id, f"the engine cannot serve: {message}"))
        self._kick()

    def _on_worker_restarted(self, rank: int) -> None:
        logger.info("worker %d is back", rank)
        self.scheduler.on_worker_restarted(rank)
        self._kick()

    def _publish(self, updates: list[RequestUpdate]) -> None:
        for update in updates:
            request = update.request
            rid = request.request_id
            if rid not in self._streams:
                continue
            if update.kind in _ENDS:
                self._observe_request(request, request.status)
            if update.kind == UpdateKind.FAILED:
                self._end_stream(rid, RequestFailedError(rid, request.error or "request failed"))
            elif update.kind == UpdateKind.ABORTED:
                self._end_stream(rid, RequestAbortedError(rid))
            elif update.kind == UpdateKind.FINISHED:
                self._streams[rid].put_nowait(self._output(request, update, finished=True))
                self._end_stream(rid, None)
            else:
                self._streams[rid].put_nowait(self._output(request, update, finished=False))

    def _end_stream(self, request_id: str, final: BaseException | None) -> None:
        self.loras.release(request_id)
        stream = self._streams.pop(request_id, None)
        if stream is not None and final is not None:
            stream.put_nowait(final)
        if not self._streams:
            self._idle.set()

    def _observe_task(self, result: TaskResult) -> None:
        """Report a task once, with its leader's result (called before the scheduler applies it)."""
        record = self._observed_tasks.get(result.task_id)
        if record is None or result.rank != record[0].group[0]:
            return
        task, images, predicted = self._observed_tasks.pop(result.task_id)
        steps = 1
        if task.stage == Stage.DENOISE:
            requests = self.scheduler.requests
            done = [item.step - requests[item.request_id].step for item in result.items
                    if item.request_id in requests and item.error is None]
            steps = max(done, default=0) or task.num_steps
        measured = result.peak_memory_bytes > 0
        stats = TaskStats(task.stage, images, len(task.group), steps, result.elapsed_s,
                          failed=result.error is not None, peak_memory_bytes=result.peak_memory_bytes,
                          predicted_peak_bytes=result.start_memory_bytes + predicted
                          if measured and predicted is not None else None)
        self._notify(lambda observer: observer.on_task(stats))

    def _observe_request(self, request: Request, status: RequestStatus) -> None:
        if not self._observers:
            return
        end = request.finished_time if request.finished_time is not None else time.monotonic()
        wait = None if request.first_scheduled_time is None else request.first_scheduled_time - request.arrival_time
        images = request.n if status == RequestStatus.FINISHED else 0
        stats = RequestStats(request.request_id, status, images, end - request.arrival_time, wait,
                             computed_steps=request.computed_steps, cached_steps=request.cached_steps)
        self._notify(lambda observer: observer.on_request(stats))

    def _notify(self, call: Callable[[EngineObserver], None]) -> None:
        notify_observers(self._observers, call)

    @staticmethod
    def _output(request: Request, update: RequestUpdate, *, finished: bool) -> RequestOutput:
        item = update.item
        latents = None
        if item is not None and item.latents is not None:
            latents = np.frombuffer(item.latents, dtype=np.float32).reshape(item.latents_shape)
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            params=request.params,
            step=request.step,
            num_steps=request.num_steps,
            finished=finished,
            images=[GeneratedImage.from_wire(i) for i in item.images] if item else [],
            previews=[GeneratedImage.from_wire(i) for i in item.previews] if item else [],
            metrics=RequestMetrics(request.arrival_time, request.first_scheduled_time, request.finished_time),
            latents=latents,
            cached_steps=request.cached_steps,
        )
