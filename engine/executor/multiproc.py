"""One worker process per device, driven from the event loop over shared-memory rings.

The executor never blocks the loop: ``submit`` encodes a task once and copies it into the
command ring of every member rank; results and process exits arrive as loop callbacks
(engine/executor/worker_handle.py). N workers run N tasks at once; the scheduler spreads
work over them.

Failure. A worker that dies is seen at once (its pidfd). The executor delivers what it
sent before dying, calls ``on_failure(rank, message)`` (the scheduler restarts that rank's
requests from scratch, up to ``max_retries``, then fails them), and starts a replacement.
A replacement that cannot start is retried ``MAX_START_ATTEMPTS`` times; then the
executor is no longer ``healthy`` and the engine fails every request. The world the
workers share is then formed again (engine/executor/world_formation.py).

On GPU, when a rank dies, the other members of its running multi-rank tasks are killed
too: their NCCL transfers wait for a peer that will never answer, and nothing but the
process group's watchdog (after the collective timeout) would end them. On CPU they see
the death within a second (the channels' pid table), fail the task and stay.
"""

from __future__ import annotations

import asyncio
import logging
import os

import msgspec

from engine.config import EngineConfig
from engine.distributed.shm_channels import World as ChannelsOwner
from engine.executor.base import Executor, FailureCallback, RestartCallback, ResultCallback
from engine.executor.device_layout import default_num_workers, gpu_layout_error, rank_device
from engine.executor.protocol import (
    FromWorker,
    Joined,
    JoinFailed,
    Leaving,
    Ready,
    Shutdown,
    StartFailed,
    WorkerSpec,
    encoder,
)
from engine.executor.shm_queue import DEFAULT_CAPACITY
from engine.executor.worker_handle import DeviceLayoutError, WorkerHandle, WorkerStartError
from engine.executor.world_formation import World, WorldFormation
from engine.messages import FreeRequests, LoraAnswer, LoraCommand, ModelInfo, Task, TaskResult

logger = logging.getLogger(__name__)

MAX_START_ATTEMPTS = 3


class MultiprocExecutor(WorldFormation, Executor):
    start_timeout_s = 600.0  # loading a large model from disk can take minutes
    stop_timeout_s = 10.0
    restart_backoff_s = 2.0  # doubled after each failed attempt to start a replacement

    def __init__(self, config: EngineConfig, *, worker_hook: str | None = None,
                 ring_capacity: int = DEFAULT_CAPACITY) -> None:
        super().__init__(config)
        parallel = config.parallel
        self._num_workers = parallel.num_workers or default_num_workers(config.model.device)
        if self._num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        devices = [rank_device(config.model.device, rank) for rank in range(self._num_workers)]
        layout_error = gpu_layout_error(devices, os.environ.get("CUDA_VISIBLE_DEVICES"))
        if layout_error is not None:
            raise DeviceLayoutError(layout_error)
        self._threads = parallel.worker_threads or (1 if self._num_workers > 1 else None)
        self._worker_hook = worker_hook
        self._ring_capacity = ring_capacity
        self._handles: list[WorkerHandle | None] = [None] * self._num_workers
        self._restarting: dict[int, asyncio.Task[None]] = {}
        self._returning: set[int] = set()  # replaced ranks that come back once the world is formed
        self._inflight: dict[int, set[int]] = {}  # task id -> ranks that owe a result
        self._multi_inflight: dict[int, tuple[int, ...]] = {}  # multi-rank task id -> its members
        self._held: list[Task] = []
        self._world = World()
        # GPU workers' collectives run over NCCL; CPU workers' over shared-memory channels,
        # made afresh for each epoch.
        self._on_gpu = rank_device(config.model.device, 0).startswith("cuda")
        self._channels: ChannelsOwner | None = None
        self._closing = False
        self._fatal: str | None = None
        # LoRA command id -> rank -> its answer, awaited by lora_command.
        self._lora_waits: dict[int, dict[int, asyncio.Future[LoraAnswer]]] = {}
        self._lora_ids = 0

    @property
    def num_workers(self) -> int:
        return self._num_workers

    @property
    def healthy(self) -> bool:
        return self._fatal is None and not self._closing

    @property
    def world_epoch(self) -> int:
        return self._world.epoch

    def worker_pids(self) -> dict[int, int]:
        return {h.rank: h.pid for h in self._handles if h is not None and h.alive}

    # ----- start ---------------------------------------------------------------------
    async def start(self, on_result: ResultCallback, on_failure: FailureCallback,
                    on_restart: RestartCallback) -> ModelInfo:
        self._loop = asyncio.get_running_loop()
        self._on_result, self._on_failure, self._on_restart = on_result, on_failure, on_restart
        self._world.formed = self._loop.create_future()
        try:
            self._open()
            for rank in range(self._num_workers):
                self._handles[rank] = self._spawn(rank)
            readies = [h.ready for h in self._handles if h is not None]
            done, pending = await asyncio.wait(readies, timeout=self.start_timeout_s,
                                               return_when=asyncio.FIRST_EXCEPTION)
            for future in done:
                future.result()  # raises the first start failure
            if pending:
                raise WorkerStartError(f"workers did not load the model within {self.start_timeout_s:.0f} s")
            self._maybe_form_world()
            await asyncio.wait_for(asyncio.shield(self._world.formed), self.join_timeout_s + 10)
        except BaseException as exc:
            await self.shutdown()
            if isinstance(exc, asyncio.TimeoutError):
                raise WorkerStartError("the workers did not form their torch.distributed world in time") from None
            raise
        for handle in self._handles:
            assert handle is not None
            handle.serving = True
        return self._handles[0].ready.result()  # type: ignore[union-attr]

    def _open(self) -> None:
        import torch.distributed as dist

        # The rendezvous for every epoch's world; served by a thread of this process.
        self._store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        # Workers hold the read end; when this process dies the write end closes and they exit.
        self._parent_r, self._parent_w = os.pipe()

    def _spawn(self, rank: int) -> WorkerHandle:
        model = self.config.model
        spec = WorkerSpec(
            rank=rank, world_size=self._num_workers, epoch=self._world.epoch + 1, model=model,
            device=rank_device(model.device, rank), threads=self._threads,
            store_host="127.0.0.1", store_port=self._store.port, join_timeout_s=self.join_timeout_s,
            cmd_fds=(-1, -1, -1), out_fds=(-1, -1, -1), ring_capacity=self._ring_capacity,
            parent_fd=self._parent_r, parent_pid=os.getpid(),
            log_level=logging.getLogger().getEffectiveLevel(), worker_hook=self._worker_hook,
            loras=list(self.loras.items()))
        handle = WorkerHandle(spec, self._on_message, self._on_exit)
        logger.info("started worker %d (pid %d)", rank, handle.pid)
        return handle

    # ----- tasks ---------------------------------------------------------------------
    def submit(self, task: Task) -> None:
        if len(task.members) > 1 and (self._world.needed or self._world.joining):
            self._held.append(task)
            return
        self._send_task(task)

    def _send_task(self, task: Task) -> None:
        members = [r for r in task.members if self._is_up(r)]
        if not members:
            return
        self._inflight[task.task_id] = set(members)
        if len(task.members) > 1:
            self._multi_inflight[task.task_id] = task.members
        self._broadcast(task, members)

    def free(self, rank: int, request_ids: list[str]) -> None:
        if self._is_up(rank):
            self._broadcast(FreeRequests(request_ids), [rank])

    def _broadcast(self, message: msgspec.Struct, ranks: list[int]) -> None:
        payload = encoder.encode(message)
        for rank in ranks:
            handle = self._handles[rank]
            if handle is not None:
                handle.send(payload)

    async def lora_command(self, name: str, path: str | None) -> list[LoraAnswer]:
        self._lora_ids += 1
        command = LoraCommand(self._lora_ids, name, path)
        ranks = [r for r in range(self._num_workers) if self._is_up(r)]
        waits = {r: self._loop.create_future() for r in ranks}
        self._lora_waits[command.command_id] = waits
        try:
            self._broadcast(command, ranks)
            return list(await asyncio.gather(*waits.values()))
        finally:
            del self._lora_waits[command.command_id]

    def _lora_answered(self, answer: LoraAnswer) -> None:
        wait = self._lora_waits.get(answer.command_id, {}).get(answer.rank)
        if wait is not None and not wait.done():
            wait.set_result(answer)

    def _is_up(self, rank: int) -> bool:
        handle = self._handles[rank]
        return handle is not None and handle.alive

    # ----- messages from workers -----------------------------------------------------
    def _on_message(self, handle: WorkerHandle, message: FromWorker) -> None:
        if isinstance(message, TaskResult):
            self._task_answered(message.task_id, handle.rank)
            if not self._closing:
                self._on_result(message)
        elif isinstance(message, LoraAnswer):
            self._lora_answered(message)
        elif isinstance(message, Ready):
            logger.info("worker %d (pid %d) loaded %s", handle.rank, message.pid, message.info.name)
            handle.ready.set_result(message.info)
        elif isinstance(message, StartFailed):
            handle.ready.set_exception(WorkerStartError(message.message))
            handle.ready.exception()
            handle.kill()
        elif isinstance(message, (Joined, JoinFailed)):
            self._join_answered(handle.rank, message)
        elif isinstance(message, Leaving):
            handle.leaving = message.reason  # its exit follows

    def _task_answered(self, task_id: int, rank: int) -> None:
        owed = self._inflight.get(task_id)
        if owed is None:
            return
        owed.discard(rank)
        if not owed:
            del self._inflight[task_id]
            self._multi_inflight.pop(task_id, None)
            self._maybe_form_world()

    # ----- failures ------------------------------------------------------------------
    def _on_exit(self, handle: WorkerHandle) -> None:
        rank = handle.rank
        if self._handles[rank] is handle:
            self._handles[rank] = None
        if self._closing:
            return
        reason = handle.exit_reason
        logger.error("%s", reason)
        if self._on_gpu:
            self._kill_stranded_peers(rank)
        for task_id in list(self._inflight):
            self._task_answered(task_id, rank)
        for command_id in list(self._lora_waits):
            self._lora_answered(LoraAnswer(command_id, rank, error=f"{reason} while loading the adapter"))
        # Held tasks with this rank were dropped by the scheduler with the rank's requests.
        self._held = [t for t in self._held if rank not in t.members]
        self._returning.discard(rank)
        world = self._world
        world.needed = True
        if rank in world.joining:
            world.joining.discard(rank)
            world.interrupted = True
            if not world.joining:
                self._world_settled()
        if world.formed is not None and not world.formed.done():
            # Still starting: start() fails with the worker's reason.
            world.formed.set_exception(WorkerStartError(reason))
            world.formed.exception()
            return
        if handle.serving:
            self._on_failure(rank, f"{reason} while running this request")
        if rank not in self._restarting or self._restarting[rank].done():
            self._restarting[rank] = self._loop.create_task(self._restart(rank))

    def _kill_stranded_peers(self, rank: int) -> None:
        """On NCCL: kill the members of ``rank``'s running multi-rank tasks that still owe a
        result (see the module docstring)."""
        for task_id, members in list(self._multi_inflight.items()):
            if rank not in members:
                continue
            for peer in sorted(self._inflight.get(task_id, ())):
                handle = self._handles[peer]
                if peer != rank and handle is not None and handle.alive:
                    logger.error("killing worker %d: its NCCL task %d waits on worker %d, which is gone",
                                 peer, task_id, rank)
                    handle.kill()

    async def _restart(self, rank: int) -> None:
        last = ""
        for attempt in range(MAX_START_ATTEMPTS):
            if self._closing:
                return
            if attempt:
                await asyncio.sleep(min(self.restart_backoff_s * 2 ** (attempt - 1), 10.0))
            handle = self._spawn(rank)
            self._handles[rank] = handle
            try:
                await asyncio.wait_for(asyncio.shield(handle.ready), self.start_timeout_s)
            except (WorkerStartError, asyncio.TimeoutError) as exc:
                last = str(exc) or "timed out loading the model"
                logger.error("replacement for worker %d failed to start: %s", rank, last)
                handle.kill()
                await handle.exited
                continue
            self._returning.add(rank)
            self._maybe_form_world()
            return
        self._give_up(rank, f"worker {rank} could not be restarted after {MAX_START_ATTEMPTS} "
                            f"attempts: {last}")

    def _give_up(self, rank: int, message: str) -> None:
        """Stop being ``healthy``; the engine then fails every request."""
        if self._fatal is None:
            logger.error("executor gives up: %s", message)
            self._fatal = message
            self._on_failure(rank, message)

    def _close_channels(self) -> None:
        if self._channels is not None:
            self._channels.close()
            self._channels = None

    # ----- shutdown ------------------------------------------------------------------
    async def shutdown(self) -> None:
        """Ask every worker to exit, kill those that do not in time; reap them all."""
        if self._closing:
            return
        self._closing = True
        current = asyncio.current_task()
        for task in self._restarting.values():
            if task is not current:
                task.cancel()
        handles = [h for h in self._handles if h is not None and h.alive]
        self._broadcast(Shutdown(), [h.rank for h in handles])
        exits = [h.exited for h in handles]
        if exits:
            _, pending = await asyncio.wait(exits, timeout=self.stop_timeout_s)
            for handle in handles:
                if not handle.exited.done():
                    logger.warning("worker %d did not stop in time; killing it", handle.rank)
                    handle.kill()
            if pending:
                await asyncio.wait(pending)
        self._close_channels()
        if hasattr(self, "_parent_w"):
            os.close(self._parent_w)
            os.close(self._parent_r)
            del self._parent_w
        self._store = None
