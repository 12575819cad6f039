"""One worker in the engine's own process, run on a thread so the event loop stays free."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os

from engine.config import EngineConfig
from engine.executor.allocator import keep_freed_memory
from engine.executor.base import Executor, FailureCallback, RestartCallback, ResultCallback
from engine.executor.device_ops import DeviceOps
from engine.executor.worker import Worker
from engine.messages import LoraAnswer, LoraCommand, ModelInfo, Task, TaskResult
from engine.models.attention import resolve_attention_backend
from engine.models.loader import load_adapter


class InProcessExecutor(Executor):
    """Rank 0 only. A single thread runs tasks and frees in the order they were sent.

    ``device_ops`` stands in for the device's synchronisation and memory readings (tests).
    """

    def __init__(self, config: EngineConfig, *, device_ops: DeviceOps | None = None) -> None:
        super().__init__(config)
        self._device_ops = device_ops

    @property
    def num_workers(self) -> int:
        return 1

    async def start(self, on_result: ResultCallback, on_failure: FailureCallback,
                    on_restart: RestartCallback) -> ModelInfo:
        self._loop = asyncio.get_running_loop()
        self._on_result = on_result
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gfdit-worker")
        model = self.config.model
        keep_freed_memory()  # this process runs the model: reuse its pages (allocator.py)
        adapter = await self._loop.run_in_executor(
            self._thread, load_adapter, model.model, model.device, model.dtype, model.backend)
        backend = resolve_attention_backend(model.attention_backend, adapter.device)
        self._worker = Worker(0, adapter, attention_backend=backend, ops=self._device_ops,
                              compile=model.compile)
        for name, path in self.loras.items():
            answer = await self.lora_command(name, path)
            if answer[0].error:
                await self.shutdown()
                raise RuntimeError(f"LoRA adapter {name!r}: {answer[0].error}")
        return adapter.info()

    async def lora_command(self, name: str, path: str | None) -> list[LoraAnswer]:
        command = LoraCommand(0, name, path)
        return [await self._loop.run_in_executor(self._thread, self._worker.lora, command)]

    def worker_pids(self) -> dict[int, int]:
        return {0: os.getpid()}

    def submit(self, task: Task) -> None:
        future = self._thread.submit(self._worker.execute, task)
        future.add_done_callback(self._deliver)

    def _deliver(self, future: concurrent.futures.Future[TaskResult]) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_result, future.result())

    def free(self, rank: int, request_ids: list[str]) -> None:
        self._thread.submit(self._worker.free, request_ids)

    async def shutdown(self) -> None:
        # Drop every state the worker still holds (a paused pipeline call unwinds), then stop.
        worker = getattr(self, "_worker", None)
        if worker is not None:
            self._thread.submit(lambda: worker.free(list(worker.states)))
        await asyncio.get_running_loop().run_in_executor(None, self._thread.shutdown, True)
