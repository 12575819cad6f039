"""Offline batch generation: JSONL in, images and a JSONL manifest out, resumable.

Every line (see ``batch_input``) is read and checked first, so bad lines are recorded
before any model work and the progress bar knows the total. The rest go through one
engine with at most ``max_in_flight`` requests in it at a time: enough that the scheduler
always has same-shape requests at different steps to batch (and, with several workers,
groups to form), few enough that memory stays bounded however long the file is. Each
finished request writes ``DIR/<id>_<k>.<fmt>`` atomically and then its manifest row (see
``batch_manifest``), so a killed or interrupted run resumes where it stopped. A bad line
or a failed request is recorded with its error and skipped, never fatal; only the
environment (the disk, the engine's workers gone for good) can stop a run.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.outputs import RequestAbortedError, RequestFailedError
from engine.params import InvalidParamsError, check_prompt
from entrypoints.batch_input import Job, default_seed, open_input, parse_line, read_jobs
from entrypoints.batch_manifest import (
    BAD_INPUT,
    FAILED,
    OK,
    Manifest,
    remove_temporaries,
    write_atomic,
)

EXIT_OK = 0
EXIT_FATAL = 1  # the run could not go on (disk, engine); what finished is kept
EXIT_USAGE = 2
EXIT_SOME_FAILED = 3  # every line was handled, but some failed (see their manifest rows)
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT)
EXIT_TERMINATED = 143  # SIGTERM

__all__ = ["EXIT_FATAL", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_SOME_FAILED", "EXIT_TERMINATED", "EXIT_USAGE",
           "BatchStats", "default_max_in_flight", "default_seed", "open_input", "parse_line", "run_batch"]


@dataclass
class BatchStats:
    done: int = 0  # requests whose images were written in this run
    images: int = 0
    skipped: int = 0  # already complete in the manifest
    failed: int = 0  # bad lines and failed requests in this run
    failed_before: int = 0  # skipped because an earlier run recorded the same bad line
    elapsed_s: float = 0.0  # generating: from the engine being ready to the last row
    errors: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def exit_status(self) -> int:
        return EXIT_SOME_FAILED if self.failed or self.failed_before else EXIT_OK


def default_max_in_flight(engine: AsyncEngine) -> int:
    """Two full batches per worker: one denoising while the next is being encoded."""
    return max(16, 2 * engine.scheduler.max_batch_size * engine.executor.num_workers)


async def run_batch(lines: Iterable[str], output_dir: Path, *, engine: AsyncEngine | None = None,
                    engine_options: dict[str, Any] | None = None, max_in_flight: int | None = None,
                    progress: Any = None) -> BatchStats:
    """Generate every line not yet complete in ``output_dir``; returns what happened.

    Uses ``engine`` if given, else starts one from ``engine_options`` only when some line
    needs it (re-running a finished batch loads no model) and stops it at the end.
    ``progress`` is a tqdm-like bar (``reset``, ``update``, ``set_postfix_str``) counting images.
    """
    config = engine.config if engine is not None else EngineConfig.create(**(engine_options or {}))
    engine_key = _engine_key(config)
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(output_dir)
    owned: AsyncEngine | None = None
    stats = BatchStats()
    try:
        remove_temporaries(output_dir)
        todo = _todo(lines, manifest, stats, engine_key)
        if not todo:
            return stats
        if engine is None:
            engine = owned = await AsyncEngine.create(config)
        started = time.monotonic()
        pending = _validated(engine, todo, manifest, stats, engine_key)
        if progress is not None:  # reset also restarts its clock: rates leave model loading out
            progress.reset(total=sum(job.params.n for job in pending))  # type: ignore[union-attr]
        try:
            await _Runner(engine, manifest, stats, progress).run_all(
                pending, max_in_flight or default_max_in_flight(engine))
        finally:
            stats.elapsed_s = time.monotonic() - started
    finally:
        try:
            if owned is not None:
                await owned.shutdown()
        finally:
            manifest.close()
    return stats


def _engine_key(config: EngineConfig) -> str:
    """What decides whether a well-formed line is within bounds: the model and the limits."""
    text = json.dumps([config.model.model, msgspec.to_builtins(config.limits)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _todo(lines: Iterable[str], manifest: Manifest, stats: BatchStats, engine_key: str) -> list[Job]:
    """Lines not complete in the manifest; unparsable ones are recorded, not returned."""
    todo = []
    for job in read_jobs(lines):
        if manifest.complete(job, engine_key):
            stats.skipped += 1
            stats.failed_before += manifest.rows[job.id]["status"] == BAD_INPUT
        elif job.error is not None:
            _record_bad_input(job, manifest, stats)
        else:
            todo.append(job)
    return todo


def _validated(engine: AsyncEngine, jobs: list[Job], manifest: Manifest, stats: BatchStats,
               engine_key: str) -> list[Job]:
    """Jobs with the model's defaults filled in; those out of the engine's bounds are recorded."""
    pending = []
    for job in jobs:
        try:
            check_prompt(job.prompt, engine.config.limits, engine.model_info)
            job.params = engine.resolve_params(job.params)
        except InvalidParamsError as exc:
            job.error = f"line {job.line} ({job.id}): {exc}"
            _record_bad_input(job, manifest, stats, engine_key)
            continue
        pending.append(job)
    return pending


def _record_bad_input(job: Job, manifest: Manifest, stats: BatchStats, engine_key: str | None = None) -> None:
    row = {"id": job.id, "status": BAD_INPUT, "files": [], "error": job.error, "input_hash": job.input_hash}
    if engine_key is not None:
        row["engine_key"] = engine_key
    manifest.write(row)
    stats.failed += 1
    stats.errors.append(job.error or "")


class _Runner:
    """Keeps up to ``max_in_flight`` jobs in the engine; writes each one's files, then its row."""

    def __init__(self, engine: AsyncEngine, manifest: Manifest, stats: BatchStats, progress: Any) -> None:
        self.engine = engine
        self.manifest = manifest
        self.stats = stats
        self.progress = progress

    async def run_all(self, jobs: list[Job], max_in_flight: int) -> None:
        window = asyncio.Semaphore(max_in_flight)
        tasks: set[asyncio.Task[None]] = set()
        failure: list[BaseException] = []

        def finished(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            window.release()
            if not task.cancelled() and task.exception() is not None:
                failure.append(task.exception())  # type: ignore[arg-type]

        try:
            for job in jobs:
                await window.acquire()
                if failure:
                    break
                task = asyncio.create_task(self.one(job))
                tasks.add(task)
                task.add_done_callback(finished)
            while tasks and not failure:
                await asyncio.wait(set(tasks), return_when=asyncio.FIRST_EXCEPTION)
            if failure:
                raise failure[0]
        finally:
            for task in tasks:
                task.cancel()  # an interrupted run aborts what is in flight; nothing half-written stays
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    async def one(self, job: Job) -> None:
        params = job.params
        assert params is not None
        final = None
        try:
            async for output in self.engine.generate(job.prompt, params):
                final = output
        except InvalidParamsError as exc:  # checked up front already; kept for engines that check more
            job.error = f"line {job.line} ({job.id}): {exc}"
            _record_bad_input(job, self.manifest, self.stats, _engine_key(self.engine.config))
            self._advance(params.n)
            return
        except (RequestFailedError, RequestAbortedError) as exc:
            self.manifest.write({"id": job.id, "status": FAILED, "files": [], "seed": params.seed,
                                 "error": str(exc), "input_hash": job.input_hash})
            self.stats.failed += 1
            self.stats.errors.append(f"{job.id}: {exc}")
            self._advance(params.n)
            return
        assert final is not None and final.finished
        files = [f"{job.id}_{k}.{image.format}" for k, image in enumerate(final.images)]
        await asyncio.to_thread(_write_all, self.manifest.output_dir, files, [i.data for i in final.images])
        metrics = final.metrics
        self.manifest.write({
            "id": job.id, "status": OK, "files": files, "seed": params.seed, "prompt": job.prompt,
            "params": {"width": params.width, "height": params.height, "steps": params.num_inference_steps,
                       "guidance": params.guidance_scale, "true_cfg_scale": params.true_cfg_scale, "n": params.n,
                       "negative_prompt": params.negative_prompt,
                       "output_format": params.output_format},
            "timings": {"queue_s": metrics.queue_time if metrics else None,
                        "latency_s": metrics.latency if metrics else None},
            "error": None, "input_hash": job.input_hash,
        })
        self.stats.done += 1
        self.stats.images += len(files)
        self._advance(len(files))

    def _advance(self, images: int) -> None:
        if self.progress is not None:
            if self.stats.failed:
                self.progress.set_postfix_str(f"{self.stats.failed} failed", refresh=False)
            self.progress.update(images)


def _write_all(output_dir: Path, names: list[str], blobs: list[bytes]) -> None:
    for name, data in zip(names, blobs):
        write_atomic(output_dir / name, data)
