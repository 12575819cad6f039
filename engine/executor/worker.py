"""A worker: runs tasks on one device and keeps each request's state between them.

The same class serves the in-process executor (called from a thread) and each worker
process of the multi-process executor. A task that raises fails only the requests in it,
whose state is dropped; the worker stays usable.

A task runs on an ordered group of workers. Migrations come first (state moves peer to
peer). Then every member encodes (identical states everywhere), or denoises with Ulysses
attention over the group (every member ends with the full latents), or, for decode, the
leader ``group[0]`` decodes while the others drop their copies. Only the leader reports
items; a member that only sent state answers with an empty result.

A task's time is taken after the device has finished its work (``DeviceOps.synchronize``).

Two failures leave a worker that must not run another task, and set ``fatal``: a sticky
CUDA error (every later kernel fails the same way), and a failed task with more than one
member or with migrations, whose collectives may now be out of step with the peers' (a
transfer left half done makes the next one hang or swap data). The process then leaves
and the engine replaces it and forms a new world (engine/executor/worker_main.py). The
one exception: on the CPU's shared-memory channels a member whose peer died stays, since
the world is formed anew (with fresh channels) before any multi-rank task runs again.
"""

from __future__ import annotations

import logging
import time
import traceback

import numpy as np
import torch

from engine.distributed.group_free import Collectives
from engine.distributed.shm_channels import PeerDiedError
from engine.distributed.ulysses import SequenceParallel, install
from engine.executor.device_ops import DeviceOps, device_ops, is_sticky_cuda_error
from engine.executor.migration import run_migrations
from engine.image_codec import encode_image
from engine.messages import ItemResult, LoraAnswer, LoraCommand, Stage, Task, TaskResult
from engine.models.base import ModelRunner, RequestState
from engine.models.compile import CompileStats, compile_repeated_blocks

logger = logging.getLogger(__name__)


def preview_steps(num_steps: int, partial_images: int) -> set[int]:
    """Steps after which a request asking for ``partial_images`` previews gets one."""
    steps = {round(num_steps * i / (partial_images + 1)) for i in range(1, partial_images + 1)}
    return {s for s in steps if 0 < s < num_steps}


class Worker:
    def __init__(self, rank: int, adapter: ModelRunner, comm: Collectives | None = None,
                 attention_backend: str = "sdpa", ops: DeviceOps | None = None,
                 compile: bool = False) -> None:
        self.rank = rank
        self.adapter = adapter
        self.ops = ops or device_ops(adapter.device)
        self.states: dict[str, RequestState] = {}
        self.sp = SequenceParallel(comm, attention_backend)
        # Why this worker must not run another task (see the module docstring); None: fine.
        self.fatal: str | None = None
        if adapter.info().sequence_parallel:
            install(adapter.transformer, adapter.family, self.sp)
        step_cache = getattr(adapter, "step_cache", None)
        if step_cache is not None:
            step_cache.sp = self.sp  # members agree on cache decisions through the group
        # Compiled blocks serve degree-1 steps; wider groups run them eagerly (compile.py).
        self.compile_stats: CompileStats | None = (
            compile_repeated_blocks(adapter.transformer, eager_when=lambda: self.sp.active) if compile else None)

    def set_collectives(self, comm: Collectives | None) -> None:
        """Join (or, with None, leave) the world's group-free collectives."""
        self.sp.comm = comm

    def execute(self, task: Task) -> TaskResult:
        start = time.perf_counter()
        ops = self.ops
        ops.reset_peak()
        resident = ops.allocated()
        try:
            run_migrations(task, self.rank, self.states, self.adapter, self.sp.comm)
            lead = task.group[0] == self.rank
            if self.rank not in task.group:
                items = []
            elif task.stage == Stage.ENCODE:
                items = self._encode(task)
            elif task.stage == Stage.DENOISE:
                with self.sp.running(task.group):
                    items = self._denoise(task, lead)
            elif lead:
                items = self._decode(task)
            else:
                self.free(task.request_ids)
                items = []
            if not lead:
                items = []
            # Inside the try: an asynchronous CUDA error surfaces here, and belongs to this task.
            ops.synchronize()
        except Exception as exc:  # noqa: BLE001 - a failing task must not take the worker down
            logger.error("rank %d: task %d (%s) failed:\n%s", self.rank, task.task_id, task.stage.name,
                         traceback.format_exc())
            self.free(task.request_ids)
            self.fatal = self._fatal_reason(task, exc)
            return TaskResult(task.task_id, self.rank, error=f"{type(exc).__name__}: {exc}",
                              elapsed_s=time.perf_counter() - start)
        elapsed = time.perf_counter() - start
        allocated = ops.allocated()
        return TaskResult(task.task_id, self.rank, items, elapsed_s=elapsed, peak_memory_bytes=ops.peak(),
                          start_memory_bytes=resident, cached_memory_bytes=max(ops.reserved() - allocated, 0))

    def _fatal_reason(self, task: Task, exc: Exception) -> str | None:
        if is_sticky_cuda_error(exc):
            return f"a CUDA error leaves its device unusable: {exc}"
        if len(task.members) > 1 or task.migrations:
            comm = self.sp.comm
            if isinstance(exc, PeerDiedError) and comm is not None and comm.renewed_with_world:
                return None
            return f"task {task.task_id} failed on {len(task.members)} ranks; its collectives may be out of step"
        return None

    def lora(self, command: LoraCommand) -> LoraAnswer:
        """Load or unload an adapter; a bad file is answered, never raised."""
        store = getattr(self.adapter, "lora", None)
        if store is None:
            return LoraAnswer(command.command_id, self.rank, error=f"model {self.adapter.name} runs through the "
                              "whole-pipeline fallback, which has no per-request LoRA")
        if command.path is None:
            store.unload(command.name)
            return LoraAnswer(command.command_id, self.rank)
        try:
            summary = store.load(command.name, command.path)
        except Exception as exc:  # noqa: BLE001 - a bad adapter must not take the worker down
            logger.warning("rank %d: adapter %s not loaded: %s", self.rank, command.name, exc)
            return LoraAnswer(command.command_id, self.rank, error=str(exc))
        return LoraAnswer(command.command_id, self.rank, modules=summary.modules, rank_max=summary.rank,
                          parameters=summary.parameters)

    def free(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            state = self.states.pop(rid, None)
            if state is not None:
                self.adapter.release(state)

    def _states(self, task: Task) -> tuple[list[RequestState], list[ItemResult]]:
        found, missing = [], []
        for rid in task.request_ids:
            state = self.states.get(rid)
            if state is None:
                missing.append(ItemResult(rid, 0, error=f"no state for request {rid} on worker {self.rank}"))
            else:
                found.append(state)
        return found, missing

    def _encode(self, task: Task) -> list[ItemResult]:
        news = task.new_requests
        states = self.adapter.new_states([r.request_id for r in news], [r.prompt for r in news],
                                         [r.params for r in news])
        self.states.update((new.request_id, state) for new, state in zip(news, states))
        return [ItemResult(r.request_id, 0) for r in news]

    def _denoise(self, task: Task, lead: bool) -> list[ItemResult]:
        states, items = self._states(task)
        previews: dict[str, list] = {}
        for _ in range(task.num_steps):
            active = [s for s in states if not s.done]
            if not active:
                break
            self.adapter.denoise(active)
            for s in active:
                if lead and s.params.partial_images and s.step in preview_steps(s.num_steps, s.params.partial_images):
                    pixels = self.adapter.preview(s)
                    previews.setdefault(s.request_id, []).extend(self._encode_pixels(p, s) for p in pixels)
        # The whole-pipeline fallback's states have no step cache (getattr).
        items.extend(ItemResult(s.request_id, s.step, previews=previews.get(s.request_id, []),
                                cached_steps=getattr(s, "cached_steps", 0)) for s in states)
        return items

    def _decode(self, task: Task) -> list[ItemResult]:
        states, items = self._states(task)
        if not states:
            return items
        for state, pixels in zip(states, self.adapter.decode(states)):
            item = ItemResult(state.request_id, state.step, images=[self._encode_pixels(p, state) for p in pixels],
                              cached_steps=getattr(state, "cached_steps", 0))
            if state.params.return_latents and state.latents is not None:
                latents = state.latents.detach().to("cpu", torch.float32).numpy()
                item.latents = np.ascontiguousarray(latents).tobytes()
                item.latents_shape = list(latents.shape)
            items.append(item)
        self.free([s.request_id for s in states])
        return items

    @staticmethod
    def _encode_pixels(pixels: np.ndarray, state: RequestState):
        return encode_image(pixels, state.params.output_format, state.params.output_compression)
