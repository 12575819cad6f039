"""`gfdit batch` end to end: bad lines recorded, re-runs skip, a killed run resumes identically."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from entrypoints.batch import EXIT_SOME_FAILED, default_seed, parse_line


def write_input(path: Path, count: int = 20, malformed: tuple[int, ...] = (4, 11)) -> None:
    lines = []
    for i in range(count):
        if i == malformed[0]:
            lines.append('{"id": "broken", "prompt": ')  # cut-off JSON
        elif i == malformed[1]:
            lines.append(json.dumps({"id": "too-big", "prompt": "x", "size": "8192x64"}))
        else:
            lines.append(json.dumps({"id": f"img{i:02d}", "prompt": f"a red fox number {i}", "size": "64x64",
                                     "steps": 3, "n": 2}))
    path.write_text("\n".join(lines) + "\n")


def batch(input_path: Path, out: Path, *extra: str, wait: bool = True):
    cmd = [sys.executable, "-m", "entrypoints.cli", "batch", str(input_path), "--output-dir", str(out),
           "--model", "tiny-flux", "--executor", "inprocess", "--no-progress", "--max-in-flight", "4", *extra]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def images(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


def assert_same_images(out: Path, reference: Path) -> None:
    """Same files with the same pixels, up to the engine's schedule-invariance tolerance: a
    resumed run batches requests differently, which moves a pixel by at most 1 of 255."""
    got, want = images(out), images(reference)
    assert sorted(got) == sorted(want)
    for name in want:
        a = np.asarray(Image.open(out / name), dtype=int)
        b = np.asarray(Image.open(reference / name), dtype=int)
        assert np.abs(a - b).max() <= 1, name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    base = tmp_path_factory.mktemp("batch")
    write_input(base / "in.jsonl")
    first = batch(base / "in.jsonl", base / "out")
    return base, first


def test_bad_lines_are_recorded_and_the_rest_generated(uninterrupted):
    base, result = uninterrupted
    assert result.returncode == EXIT_SOME_FAILED, result.stderr
    manifest = rows(base / "out")
    errors = [r for r in manifest if r["error"]]
    assert sorted(r["id"] for r in errors) == ["line-5", "too-big"]
    assert "invalid JSON" in next(r for r in errors if r["id"] == "line-5")["error"]
    assert "width must be between" in next(r for r in errors if r["id"] == "too-big")["error"]
    good = [r for r in manifest if not r["error"]]
    assert len(good) == 18 and len(images(base / "out")) == 36
    row = next(r for r in good if r["id"] == "img00")
    assert row["files"] == ["img00_0.png", "img00_1.png"] and row["seed"] == default_seed("img00")
    assert row["params"]["steps"] == 3 and row["timings"]["latency_s"] > 0


def test_a_rerun_generates_nothing_new(uninterrupted):
    base, _ = uninterrupted
    before = images(base / "out")
    manifest_before = (base / "out" / "manifest.jsonl").read_text()
    again = batch(base / "in.jsonl", base / "out")
    assert again.returncode == EXIT_SOME_FAILED  # the two bad lines are still bad
    assert "0 requests (0 images), 20 already done" in again.stdout
    assert images(base / "out") == before
    assert (base / "out" / "manifest.jsonl").read_text() == manifest_before


def test_a_killed_run_resumes_to_the_same_images(uninterrupted, tmp_path):
    base, _ = uninterrupted
    out = tmp_path / "out"
    proc = batch(base / "in.jsonl", out, wait=False)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        manifest = out / "manifest.jsonl"
        if manifest.exists() and sum(1 for _ in manifest.open()) >= 6:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    partial = rows(out)
    assert 6 <= len(partial) < 20
    resumed = batch(base / "in.jsonl", out)
    assert resumed.returncode == EXIT_SOME_FAILED, resumed.stderr
    ids = [r["id"] for r in rows(out)]
    assert len(ids) == len(set(ids)) == 20  # no id written twice
    assert_same_images(out, base / "out")
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_ctrl_c_stops_cleanly_and_the_next_run_resumes(uninterrupted, tmp_path):
    base, _ = uninterrupted
    out = tmp_path / "out"
    proc = batch(base / "in.jsonl", out, wait=False)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (out / "manifest.jsonl").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "run the same command again to resume" in stderr
    assert batch(base / "in.jsonl", out).returncode == EXIT_SOME_FAILED
    assert_same_images(out, base / "out")


@pytest.mark.parametrize("line, error", [
    ("[1, 2]", "expected a JSON object"),
    ('{"prompt": ""}', "prompt must be a non-empty string"),
    ('{"prompt": "x", "colour": "red"}', "unknown field(s): colour"),
    ('{"prompt": "x", "id": "../etc"}', "id must be"),
    ('{"prompt": "x", "size": "big"}', "size must be N or 'WxH'"),
])
def test_malformed_lines_say_what_is_wrong(line, error):
    job = parse_line(line, 7)
    assert job.error is not None and error in job.error and "line 7" in job.error


def test_stdin_input(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"id": "one", "prompt": "a fox", "size": 64, "steps": 2}) + "\n")
    cmd = [sys.executable, "-m", "entrypoints.cli", "batch", "-", "-o", str(tmp_path / "out"), "--model",
           "tiny-flux", "--executor", "inprocess", "--no-progress"]
    result = subprocess.run(cmd, input=path.read_text(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "one_0.png").exists()
