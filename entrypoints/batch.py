"""Offline batch generation: JSONL in, images and a JSONL manifest out, resumable.

Every input line is a JSON object: ``prompt`` and optionally ``id``, ``negative_prompt``,
``size`` ("WxH" or N), ``steps``, ``guidance``, ``seed``, ``n``, ``output_format``. All
lines go through one engine with at most ``max_in_flight`` requests at a time, so the
engine batches them. Each finished request writes ``DIR/<id>_<k>.<fmt>`` atomically
(temporary file, then rename) and then one manifest row; a row exists only for work that
is complete, so a killed run resumes where it stopped: ids whose last row succeeded with
every file present, or failed on its input, are skipped. A bad line is recorded with its
error and skipped, never fatal. Seeds default to a hash of the id, so a re-run makes the
same images.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from engine.async_engine import AsyncEngine
from engine.outputs import RequestAbortedError, RequestFailedError
from engine.request import MAX_SEED, ImageParams, InvalidParamsError

EXIT_OK = 0
EXIT_SOME_FAILED = 3  # every line was handled, but some failed (see their manifest rows)
EXIT_INTERRUPTED = 130
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_FIELDS = {"id", "prompt", "negative_prompt", "size", "steps", "guidance", "seed", "n", "output_format"}


@dataclass
class Job:
    id: str
    prompt: str = ""
    params: ImageParams | None = None
    error: str | None = None  # set when the line itself is bad
    line_hash: str = ""  # identifies the line's content, to tell an edited line from a re-run


@dataclass
class BatchStats:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    failed_before: int = 0  # skipped because an earlier run recorded the same bad line
    images: int = 0
    errors: list[str] = field(default_factory=list)


def default_seed(job_id: str) -> int:
    return int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:8], "big") & MAX_SEED


def parse_line(text: str, line_number: int) -> Job:
    """One input line -> a Job (with ``error`` set when the line is unusable)."""
    fallback = f"line-{line_number}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return Job(fallback, error=f"line {line_number}: invalid JSON: {exc.msg}")
    if not isinstance(data, dict):
        return Job(fallback, error=f"line {line_number}: expected a JSON object")
    job_id = data.get("id", fallback)
    if not isinstance(job_id, str) or not _ID.match(job_id):
        return Job(fallback, error=f"line {line_number}: id must be 1-128 letters, digits, '.', '_' or '-'")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        return Job(job_id, error=f"line {line_number}: unknown field(s): {', '.join(unknown)}")
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return Job(job_id, error=f"line {line_number}: prompt must be a non-empty string")
    try:
        width = height = None
        if "size" in data:
            width, height = _parse_size(data["size"])
        params = ImageParams(
            negative_prompt=data.get("negative_prompt"), n=data.get("n", 1), width=width, height=height,
            num_inference_steps=data.get("steps"), guidance_scale=data.get("guidance"),
            seed=data.get("seed", default_seed(job_id)), output_format=data.get("output_format", "png"))
    except (TypeError, ValueError) as exc:
        return Job(job_id, error=f"line {line_number}: {exc}")
    return Job(job_id, prompt, params)


def _parse_size(size: Any) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    if isinstance(size, str) and re.fullmatch(r"\d+x\d+", size):
        width, height = size.split("x")
        return int(width), int(height)
    raise ValueError(f"size must be N or 'WxH', got {size!r}")


def read_jobs(lines: Iterable[str]) -> Iterator[Job]:
    seen: set[str] = set()
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        job = parse_line(text, number)
        if job.id in seen and job.error is None:
            job = Job(f"line-{number}", error=f"line {number}: duplicate id {job.id!r}")
        seen.add(job.id)
        job.line_hash = hashlib.sha256(text.strip().encode()).hexdigest()[:16]
        yield job


class Manifest:
    """The append-only record of what exists: one JSON row per finished (or failed) id."""

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / "manifest.jsonl"
        self.rows: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            for text in self.path.read_text().splitlines():
                try:
                    row = json.loads(text)
                except json.JSONDecodeError:
                    continue  # a row cut short by a crash: its id is simply redone
                self.rows[row["id"]] = row
        self._file: TextIO = self.path.open("a")

    def complete(self, job: Job, output_dir: Path) -> bool:
        """Whether this id needs no more work: its images exist, or this same line was bad."""
        row = self.rows.get(job.id)
        if row is None:
            return False
        if row.get("error"):
            return row.get("input_hash") == job.line_hash
        return all((output_dir / name).exists() for name in row["files"])

    def write(self, row: dict[str, Any]) -> None:
        self.rows[row["id"]] = row
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def run_batch(engine: AsyncEngine, lines: Iterable[str], output_dir: Path, *, max_in_flight: int = 64,
                    progress: Any = None) -> BatchStats:
    """Generate every job not yet complete in ``output_dir``; returns what happened."""
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(output_dir)
    stats = BatchStats()
    window = asyncio.Semaphore(max_in_flight)

    async def one(job: Job) -> None:
        try:
            await _generate(engine, job, output_dir, manifest, stats, progress)
        finally:
            window.release()

    tasks: set[asyncio.Task[None]] = set()
    try:
        for job in read_jobs(lines):
            if manifest.complete(job, output_dir):
                stats.skipped += 1
                if manifest.rows[job.id].get("error"):
                    stats.failed_before += 1
                continue
            if job.error is not None:
                manifest.write({"id": job.id, "files": [], "error": job.error, "input_hash": job.line_hash})
                stats.failed += 1
                stats.errors.append(job.error)
                continue
            try:
                job.params = engine.resolve_params(job.params)
            except InvalidParamsError as exc:
                error = f"{job.id}: {exc}"
                manifest.write({"id": job.id, "files": [], "error": error, "input_hash": job.line_hash})
                stats.failed += 1
                stats.errors.append(error)
                continue
            if progress is not None:
                progress.total = (progress.total or 0) + job.params.n
                progress.refresh()
            await window.acquire()
            task = asyncio.create_task(one(job))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()  # an interrupted run aborts what is in flight; nothing half-written stays
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        manifest.close()
    return stats


async def _generate(engine: AsyncEngine, job: Job, output_dir: Path, manifest: Manifest, stats: BatchStats,
                    progress: Any) -> None:
    params = job.params
    assert params is not None
    started = time.monotonic()
    try:
        final = None
        async for output in engine.generate(job.prompt, params):
            final = output
    except (RequestFailedError, RequestAbortedError) as exc:
        manifest.write({"id": job.id, "files": [], "seed": params.seed, "error": str(exc)})
        stats.failed += 1
        stats.errors.append(f"{job.id}: {exc}")
        return
    assert final is not None
    files = []
    for k, image in enumerate(final.images):
        name = f"{job.id}_{k}.{image.format}"
        await asyncio.to_thread(_write_atomic, output_dir / name, image.data)
        files.append(name)
    metrics = final.metrics
    manifest.write({
        "id": job.id, "files": files, "seed": params.seed, "prompt": job.prompt,
        "params": {"width": params.width, "height": params.height, "steps": params.num_inference_steps,
                   "guidance": params.guidance_scale, "n": params.n, "negative_prompt": params.negative_prompt,
                   "output_format": params.output_format},
        "timings": {"queue_s": metrics.queue_time if metrics else None,
                    "latency_s": metrics.latency if metrics else time.monotonic() - started},
        "error": None,
    })
    stats.done += 1
    stats.images += len(files)
    if progress is not None:
        progress.update(len(files))


def open_input(path: str) -> TextIO:
    return sys.stdin if path == "-" else open(path)  # noqa: SIM115 - closed by the caller
