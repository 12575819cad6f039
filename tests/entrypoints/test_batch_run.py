"""run_batch over a real engine: engine bounds, edits, retries, crash leftovers, the lock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.async_engine import AsyncEngine
from engine.outputs import RequestFailedError
from entrypoints.batch import run_batch
from entrypoints.batch_manifest import Manifest, ManifestLockedError


@pytest.fixture
async def engine():
    engine = await AsyncEngine.create(model="tiny-flux", device="cpu", executor="inprocess", max_prompt_chars=40)
    yield engine
    await engine.shutdown()


class FailingEngine:
    """The real engine, except that prompts containing 'FAIL' fail in the engine."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    async def generate(self, prompt, params):
        if "FAIL" in prompt:
            raise RequestFailedError("x", "worker exploded")
        async for out in self._engine.generate(prompt, params):
            yield out


class Progress:
    def __init__(self) -> None:
        self.total, self.n, self.postfix = None, 0, ""

    def reset(self, total: int) -> None:
        self.total, self.n = total, 0

    def update(self, k: int) -> None:
        self.n += k

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text


def line(job_id: str, prompt: str = "a red fox", **fields) -> str:
    return json.dumps({"id": job_id, "prompt": prompt, "size": 64, "steps": 2, **fields})


def rows(out: Path) -> dict[str, dict]:
    """The last row of each id, as the manifest reads it."""
    return {row["id"]: row for row in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}


async def test_engine_bounds_are_bad_lines_and_the_bar_knows_the_total(engine, tmp_path):
    lines = [line("long", "a fox " * 10), line("steps", steps=500), line("ok", n=2), line("ok2")]
    progress = Progress()
    # The line's number and id are in the error, for finding it in a long file.
    stats = await run_batch(lines, tmp_path, engine=engine, progress=progress)
    got = rows(tmp_path)
    assert got["long"]["status"] == "bad_input"
    assert got["long"]["error"] == "line 1 (long): prompt is longer than 40 characters"
    assert got["steps"]["status"] == "bad_input" and "num_inference_steps" in got["steps"]["error"]
    assert got["ok"]["files"] == ["ok_0.png", "ok_1.png"] and got["ok2"]["status"] == "ok"
    assert (stats.done, stats.images, stats.failed, stats.exit_status) == (2, 3, 2, 3)
    assert progress.total == 3 and progress.n == 3 and progress.postfix == "2 failed"
    assert stats.elapsed_s > 0 and stats.images_per_s > 0
    again = await run_batch(lines, tmp_path, engine=engine)
    assert (again.done, again.skipped, again.failed_before) == (0, 4, 2)


async def test_a_line_out_of_bounds_is_checked_again_when_the_limits_change(engine, tmp_path):
    lines = [line("long", "a fox " * 10), line("many", n=11)]
    await run_batch(lines, tmp_path, engine=engine)
    assert {row["status"] for row in rows(tmp_path).values()} == {"bad_input"}
    other = await AsyncEngine.create(model="tiny-flux", device="cpu", executor="inprocess", max_n=11)
    try:
        stats = await run_batch(lines, tmp_path, engine=other)
    finally:
        await other.shutdown()
    assert (stats.done, stats.images, stats.skipped, stats.failed) == (2, 12, 0, 0)
    assert len(rows(tmp_path)["many"]["files"]) == 11


async def test_only_edited_lines_are_made_again(engine, tmp_path):
    first = await run_batch([line("a"), line("b")], tmp_path, engine=engine)
    assert first.done == 2
    before = (tmp_path / "a_0.png").read_bytes()
    again = await run_batch([line("a"), line("b", "a blue cat")], tmp_path, engine=engine)
    assert (again.done, again.skipped) == (1, 1)
    assert rows(tmp_path)["b"]["prompt"] == "a blue cat"
    assert (tmp_path / "a_0.png").read_bytes() == before


async def test_a_failed_request_is_recorded_and_retried_next_run(engine, tmp_path):
    lines = [line("good"), line("bad", "FAIL now")]
    stats = await run_batch(lines, tmp_path, engine=FailingEngine(engine))
    assert (stats.done, stats.failed, stats.exit_status) == (1, 1, 3)
    row = rows(tmp_path)["bad"]
    assert row["status"] == "failed" and row["error"] == "worker exploded" and row["files"] == []
    # The next run (the engine healthy again) retries it and leaves the good one alone.
    stats = await run_batch(lines, tmp_path, engine=engine)
    assert (stats.done, stats.skipped, stats.exit_status) == (1, 1, 0)
    assert rows(tmp_path)["bad"]["files"] == ["bad_0.png"]


async def test_crash_leftovers_are_cleaned_up(engine, tmp_path):
    await run_batch([line("a")], tmp_path, engine=engine)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(manifest.read_text() + '{"id": "b", "status": "o')  # a row cut off by a crash
    (tmp_path / ".c_0.png.tmp").write_bytes(b"half an image")  # c is not even in this run
    stats = await run_batch([line("a"), line("b")], tmp_path, engine=engine)
    assert (stats.done, stats.skipped) == (1, 1)
    text = manifest.read_text().splitlines()
    assert json.loads(text[-1])["id"] == "b"  # the new row starts on its own line
    assert not (tmp_path / ".c_0.png.tmp").exists() and (tmp_path / "b_0.png").is_file()


async def test_a_disk_error_stops_the_run_and_keeps_what_finished(engine, tmp_path, monkeypatch):
    def full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("entrypoints.batch.write_atomic", full)
    with pytest.raises(OSError, match="No space left"):
        await run_batch([line("a"), line("b")], tmp_path, engine=engine)
    assert engine.num_unfinished == 0  # nothing left running in the engine
    Manifest(tmp_path).close()  # the lock was released


def test_one_writer_per_directory(tmp_path):
    first = Manifest(tmp_path)
    try:
        with pytest.raises(ManifestLockedError, match="another gfdit batch"):
            Manifest(tmp_path)
    finally:
        first.close()
    Manifest(tmp_path).close()
