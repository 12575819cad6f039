"""A model that cannot be loaded: one line on stderr, exit status 1, no traceback, every command."""

import os
import subprocess
import sys

import pytest

CASES = [
    (["generate", "a red circle", "--model", "tiny-pixrt"], "unknown model 'tiny-pixrt'"),
    (["serve", "/nonexistent/gfdit-model", "--port", "0"], "model folder '/nonexistent/gfdit-model' does not exist"),
    (["batch", "prompts.jsonl", "-o", "out", "--model", "gfdit-test/no-such-model"],
     "could not fetch 'gfdit-test/no-such-model' from the Hugging Face hub"),
]


@pytest.mark.parametrize(("argv", "expected"), CASES, ids=["unknown-preset", "missing-folder", "hub-id"])
def test_a_model_that_cannot_load_is_one_line_and_exit_1(argv, expected, tmp_path):
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a red circle"}\n')
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "entrypoints.cli", "--log-level", "warning", *argv],
                          cwd=tmp_path, env={**env, "PYTHONPATH": os.getcwd()}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("gfdit: error: ") and expected in lines[0]
    assert "Traceback" not in proc.stderr
