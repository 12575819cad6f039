"""Measure this machine's stage times through the engine's own executor; write a profile.

A profile must predict what the engine will see, so the profiler runs real tasks through
the same Executor the engine uses (same worker code, same hops between processes) and
times each from submit to the last member's result on the event loop. It measures what
the executor can run: degrees up to its number of workers that divide the model's heads,
and state migrations (the extra time of a step that first moves the state to another
rank) only when there are at least two workers.

Each (degree, size, batch) runs ``cycles`` times: encode, ``steps`` denoise steps, decode,
after one untimed warm-up cycle (first calls allocate). The median of each stage counts.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from engine.executor.base import Executor
from engine.messages import Migration, ModelInfo, NewRequest, Stage, Task, TaskResult
from engine.params import ImageParams, Limits
from engine.scheduler.profile import MigrationSpec, Point, Profile

PROMPT = "a photo of a lighthouse on a cliff at dawn, detailed"


@dataclass(frozen=True)
class ProfileSpec:
    sizes: tuple[tuple[int, int], ...] = ((256, 256), (512, 512))
    batch_sizes: tuple[int, ...] = (1, 2, 4)
    degrees: tuple[int, ...] | None = None  # None: every degree the executor and the model allow
    cycles: int = 2
    steps: int = 3


class Profiler:
    def __init__(self, executor: Executor, clock: Callable[[], float] = time.perf_counter) -> None:
        self.executor = executor
        self.clock = clock
        self.info: ModelInfo | None = None
        self._pending: dict[int, tuple[set[int], asyncio.Future[float]]] = {}
        self._task_ids = itertools.count()

    async def start(self) -> ModelInfo:
        self.info = await self.executor.start(self._on_result, self._on_failure, lambda rank: None)
        return self.info

    async def shutdown(self) -> None:
        await self.executor.shutdown()

    def degrees(self, spec: ProfileSpec) -> tuple[int, ...]:
        assert self.info is not None
        possible = self.info.degrees(self.executor.num_workers)
        return tuple(d for d in possible if spec.degrees is None or d in spec.degrees)

    async def measure(self, spec: ProfileSpec, model: str, device: str, source: str = "") -> Profile:
        info = self.info
        assert info is not None, "start() first"
        points: list[Point] = []
        for degree in self.degrees(spec):
            group = tuple(range(degree))
            for (width, height), batch in itertools.product(spec.sizes, spec.batch_sizes):
                times = await self._cycles(spec, group, width, height, batch)
                for stage in ("encode", "denoise", "decode"):
                    if stage == "denoise" or degree == 1:
                        points.append(Point(stage, width, height, batch, degree,
                                            round(statistics.median(times[stage]) * 1e3, 3)))
        migration = MigrationSpec()
        if self.executor.num_workers >= 2 and info.state_transfer:
            migration = await self._migration(spec)
        return Profile(model=model, size_multiple=info.size_multiple, default_steps=info.default_steps,
                       points=tuple(points), device=device, source=source, migration=migration)

    # ----- measuring ---------------------------------------------------------------
    async def _cycles(self, spec: ProfileSpec, group: tuple[int, ...], width: int, height: int,
                      batch: int) -> dict[str, list[float]]:
        times: dict[str, list[float]] = {"encode": [], "denoise": [], "decode": []}
        for cycle in range(spec.cycles + 1):
            warm = cycle > 0
            ids = await self._encode(group, width, height, batch, spec.steps, times["encode"] if warm else None)
            for _ in range(spec.steps if warm else 1):
                seconds = await self.run(Task(next(self._task_ids), Stage.DENOISE, ids, group))
                if warm:
                    times["denoise"].append(seconds)
            seconds = await self.run(Task(next(self._task_ids), Stage.DECODE, ids, group[:1]))
            if warm:
                times["decode"].append(seconds)
            for rank in group[1:]:
                self.executor.free(rank, ids)
        return times

    async def _encode(self, group: tuple[int, ...], width: int, height: int, batch: int, steps: int,
                      record: list[float] | None) -> list[str]:
        assert self.info is not None
        params = ImageParams(width=width, height=height, num_inference_steps=steps + 1, seed=0)
        params = params.resolve(self.info, Limits())
        ids = [uuid.uuid4().hex for _ in range(batch)]
        news = [NewRequest(rid, f"{PROMPT} {k}", params) for k, rid in enumerate(ids)]
        seconds = await self.run(Task(next(self._task_ids), Stage.ENCODE, ids, group, new_requests=news))
        if record is not None:
            record.append(seconds)
        return ids

    async def _migration(self, spec: ProfileSpec) -> MigrationSpec:
        """A step on rank 1 for a request whose state is on rank 0, less the same step in place."""
        assert self.info is not None
        samples: list[tuple[int, float]] = []
        for width, height in spec.sizes:
            ids = await self._encode((0,), width, height, 1, 2 * spec.cycles + 1, None)
            here, moved, rank = [], [], 0
            for _ in range(spec.cycles):
                here.append(await self.run(Task(next(self._task_ids), Stage.DENOISE, ids, (rank,))))
                other = 1 - rank
                moved.append(await self.run(Task(next(self._task_ids), Stage.DENOISE, ids, (other,),
                                                 migrations=[Migration(ids[0], rank, (other,))])))
                rank = other
            await self.run(Task(next(self._task_ids), Stage.DECODE, ids, (rank,)))
            tokens = self.info.image_tokens(width, height)
            samples.append((tokens, max(0.0, statistics.median(moved) - statistics.median(here)) * 1e3))
        (t0, m0), (t1, m1) = samples[0], samples[-1]
        per_token = max(0.0, (m1 - m0) / (t1 - t0)) if t1 != t0 else 0.0
        return MigrationSpec(latency_ms=round(max(0.0, m0 - per_token * t0), 4), ms_per_token=per_token,
                             measured=True)

    async def run(self, task: Task) -> float:
        """Submit ``task`` and wait for every member; its wall time in seconds."""
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pending[task.task_id] = (set(task.members), future)
        start = self.clock()
        self.executor.submit(task)
        return await future - start

    def _on_result(self, result: TaskResult) -> None:
        entry = self._pending.get(result.task_id)
        if entry is None:
            return
        waiting, future = entry
        errors = [result.error] + [item.error for item in result.items]
        error = next((e for e in errors if e), None)
        if error and not future.done():
            future.set_exception(RuntimeError(f"task {result.task_id} failed on rank {result.rank}: {error}"))
        waiting.discard(result.rank)
        if not waiting:
            del self._pending[result.task_id]
            if not future.done():
                future.set_result(self.clock())

    def _on_failure(self, rank: int, message: str) -> None:
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(RuntimeError(f"worker {rank} failed: {message}"))
        self._pending.clear()


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    sizes = []
    for part in text.split(","):
        width, _, height = part.lower().partition("x")
        sizes.append((int(width), int(height or width)))
    return tuple(sizes)

