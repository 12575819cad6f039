"""`gfdit batch` end to end: bad lines recorded, re-runs skip, a killed run resumes identically.

Runs that must be real processes (killed, interrupted, a re-run that must not load the
model) are subprocesses; the others call the same command line in this process, which
spares them the interpreter and torch start-up.
"""

import contextlib
import io
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

from entrypoints.batch import EXIT_SOME_FAILED, EXIT_TERMINATED, default_seed, parse_line
from entrypoints.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[2]
OPTIONS = ["--model", "tiny-flux", "--executor", "inprocess", "--no-progress", "--max-in-flight", "4"]


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


def batch_here(input_path: Path | str, out: Path, *extra: str) -> tuple[int, str, str]:
    """`gfdit batch` in this process: (exit status, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli_main(["batch", str(input_path), "--output-dir", str(out), *OPTIONS, *extra])
    return code, stdout.getvalue(), stderr.getvalue()


def batch_process(input_path: Path, out: Path, *, wait: bool = True):
    cmd = [sys.executable, "-m", "entrypoints.cli", "batch", str(input_path), "--output-dir", str(out), *OPTIONS]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def images(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


def wait_for_rows(out: Path, count: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    manifest = out / "manifest.jsonl"
    while time.monotonic() < deadline:
        if manifest.exists() and sum(1 for _ in manifest.open()) >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"the manifest never reached {count} rows")


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
    return base, batch_here(base / "in.jsonl", base / "out")


def test_bad_lines_are_recorded_and_the_rest_generated(uninterrupted):
    base, (code, stdout, stderr) = uninterrupted
    assert code == EXIT_SOME_FAILED, stderr
    manifest = rows(base / "out")
    errors = [r for r in manifest if r["error"]]
    assert sorted(r["id"] for r in errors) == ["line-5", "too-big"]
    assert {r["status"] for r in errors} == {"bad_input"}
    assert "invalid JSON" in next(r for r in errors if r["id"] == "line-5")["error"]
    assert "width must be between" in next(r for r in errors if r["id"] == "too-big")["error"]
    good = [r for r in manifest if not r["error"]]
    assert len(good) == 18 and len(images(base / "out")) == 36
    row = next(r for r in good if r["id"] == "img00")
    assert row["status"] == "ok" and row["files"] == ["img00_0.png", "img00_1.png"]
    assert row["seed"] == default_seed("img00")
    assert row["params"]["steps"] == 3 and row["timings"]["latency_s"] > 0
    assert "18 requests (36 images)" in stdout and "2 failed" in stdout


def test_a_rerun_generates_nothing_new_and_loads_no_model(uninterrupted):
    base, _ = uninterrupted
    before = images(base / "out")
    manifest_before = (base / "out" / "manifest.jsonl").read_text()
    again = batch_process(base / "in.jsonl", base / "out")
    assert again.returncode == EXIT_SOME_FAILED  # the two bad lines are still bad
    assert "0 requests (0 images), 20 already done (2 of them failed lines)" in again.stdout
    assert "engine ready" not in again.stderr
    assert images(base / "out") == before
    assert (base / "out" / "manifest.jsonl").read_text() == manifest_before


def test_a_killed_run_resumes_to_the_same_images(uninterrupted, tmp_path):
    base, _ = uninterrupted
    out = tmp_path / "out"
    proc = batch_process(base / "in.jsonl", out, wait=False)
    wait_for_rows(out, 6)  # the 2 bad lines, then some images
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    # Whole rows only: the kill may have cut the last one short (the resumed run ignores it).
    partial = (out / "manifest.jsonl").read_text().split("\n")[:-1]
    assert 6 <= len(partial) < 20
    code, stdout, stderr = batch_here(base / "in.jsonl", out)
    assert code == EXIT_SOME_FAILED, stderr
    ids = [r["id"] for r in rows(out)]
    assert len(ids) == len(set(ids)) == 20  # no id written twice
    assert f"{len(partial)} already done" in stdout
    assert_same_images(out, base / "out")
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_ctrl_c_stops_cleanly_and_the_next_run_resumes(uninterrupted, tmp_path):
    base, _ = uninterrupted
    out = tmp_path / "out"
    proc = batch_process(base / "in.jsonl", out, wait=False)
    wait_for_rows(out, 2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "run the same command again to resume" in stderr
    assert all(r["status"] in ("ok", "bad_input") for r in rows(out))  # nothing recorded as failed
    code, _, stderr = batch_here(base / "in.jsonl", out)
    assert code == EXIT_SOME_FAILED, stderr
    assert_same_images(out, base / "out")


def test_sigterm_stops_cleanly_with_its_own_status(uninterrupted, tmp_path):
    base, _ = uninterrupted
    out = tmp_path / "out"
    proc = batch_process(base / "in.jsonl", out, wait=False)
    wait_for_rows(out, 2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_TERMINATED, stderr
    assert "terminated: finished images are kept" in stderr
    for row in rows(out):
        assert row["status"] in ("ok", "bad_input")
        assert all((out / name).is_file() for name in row["files"])
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


@pytest.mark.parametrize("line, error", [
    ("[1, 2]", "expected a JSON object"),
    ('{"prompt": ""}', "prompt must be a non-empty string"),
    ('{"prompt": "x", "colour": "red"}', "unknown field(s): colour"),
    ('{"prompt": "x", "id": "../etc"}', "id must be"),
    ('{"prompt": "x", "size": "big"}', "size must be N or 'WxH'"),
    ('{"prompt": "x", "negative_prompt": 3}', "negative_prompt must be a string"),
    ('{"prompt": "x", "output_format": "raw"}', "output_format must be one of png, jpeg, webp"),
])
def test_malformed_lines_say_what_is_wrong(line, error):
    job = parse_line(line, 7)
    assert job.error is not None and error in job.error and "line 7" in job.error


def test_a_line_without_id_or_seed_gets_stable_ones():
    job = parse_line('{"prompt": "a fox", "seed": null, "n": null, "size": "96x64"}', 3)
    assert job.error is None and job.id == "line-3" and job.params.seed == default_seed("line-3")
    assert (job.params.n, job.params.width, job.params.height) == (1, 96, 64)
    # Key order and spacing do not make a line new; a changed value does.
    same = parse_line('{"size":"96x64","n":null,"seed":null,"prompt":"a fox"}', 3)
    edited = parse_line('{"prompt": "a cat", "seed": null, "n": null, "size": "96x64"}', 3)
    assert same.input_hash == job.input_hash != edited.input_hash


def test_stdin_input(tmp_path, monkeypatch):
    line = json.dumps({"id": "one", "prompt": "a fox", "size": 64, "steps": 2})
    monkeypatch.setattr(sys, "stdin", io.StringIO(line + "\n"))
    code, stdout, stderr = batch_here("-", tmp_path / "out")
    assert code == 0, stderr
    assert Image.open(tmp_path / "out" / "one_0.png").size == (64, 64)
    assert "1 requests (1 images)" in stdout


def test_usage_errors_exit_2(tmp_path):
    assert batch_here(tmp_path / "missing.jsonl", tmp_path / "out")[0] == 2
    (tmp_path / "in.jsonl").write_text("")
    code, _, stderr = batch_here(tmp_path / "in.jsonl", tmp_path / "out", "--max-in-flight", "0")
    assert code == 2 and "--max-in-flight" in stderr
