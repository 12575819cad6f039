"""Every example runs, so none of them rots."""

import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_offline_generate_example(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples/offline/generate.py"), "--out-dir", str(tmp_path), "--steps", "2",
         "--model", "tiny-flux"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "prompt2_1.png").size == (256, 128)
    assert result.stdout.count("seed=") == 4


def test_offline_batch_example(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "entrypoints.cli", "batch", str(ROOT / "examples/offline/batch.jsonl"),
         "-o", str(tmp_path), "--model", "tiny-flux", "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert {p.name for p in tmp_path.iterdir()} >= {"fox_0.png", "castle_0.png", "robots_0.jpeg",
                                                    "robots_1.jpeg", "quick_0.png", "manifest.jsonl"}
