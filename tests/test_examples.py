"""Every example runs, so none of them rots.

Scripts run as their own processes, as a user runs them, against this tree (PYTHONPATH);
the online ones talk to a real server on an ephemeral port of this machine.
"""

import io
import json
import os
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from PIL import Image

from entrypoints.cli import main as cli_main
from tests.entrypoints.conftest import API_KEY, ServerThread

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def run_example(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=300, cwd=cwd, env=env or ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def image(path: Path) -> Image.Image:
    opened = Image.open(path)
    opened.load()  # a truncated file fails here
    return opened


@pytest.fixture(scope="module")
def server():
    from entrypoints.api_server import ServerConfig

    server = ServerThread(ServerConfig(port=0, api_key=API_KEY))
    yield server
    server.close()


@pytest.fixture
def client_env(server):
    return {**ENV, "GFDIT_URL": server.url, "GFDIT_API_KEY": API_KEY}


def test_offline_generate_example(tmp_path):
    result = run_example(sys.executable, str(ROOT / "examples/offline/generate.py"), "--out-dir", str(tmp_path),
                         "--steps", "2", "--model", "tiny-flux")
    assert image(tmp_path / "prompt2_1.png").size == (256, 128)
    assert result.stdout.count("seed=") == 4


def test_offline_batch_example(tmp_path):
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = cli_main(["batch", str(ROOT / "examples/offline/batch.jsonl"), "-o", str(tmp_path),
                         "--model", "tiny-flux", "--executor", "inprocess", "--no-progress"])
    assert code == 0, stderr.getvalue()
    assert {p.name for p in tmp_path.iterdir()} == {"fox_0.png", "castle_0.png", "robots_0.jpeg",
                                                    "robots_1.jpeg", "quick_0.png", "manifest.jsonl"}
    assert image(tmp_path / "robots_1.jpeg").size == (256, 128)
    manifest = {row["id"]: row for row in map(json.loads, (tmp_path / "manifest.jsonl").read_text().splitlines())}
    assert manifest["fox"]["seed"] == 1 and manifest["quick"]["params"]["steps"] == 8


def test_openai_client_example(client_env, tmp_path):
    result = run_example(sys.executable, str(ROOT / "examples/online/openai_client.py"), "--size", "64x64",
                         "--quality", "low", "--out-dir", str(tmp_path), env=client_env)
    assert image(tmp_path / "openai_0.png").size == image(tmp_path / "openai_1.png").size == (64, 64)
    assert image(tmp_path / "openai_link.jpeg").format == "JPEG"
    assert "tiny-pixart" in result.stdout and "usage: 32 image tokens" in result.stdout


def test_streaming_client_example(client_env, tmp_path):
    result = run_example(sys.executable, str(ROOT / "examples/online/streaming_client.py"), "--size", "64x64",
                         "--partial-images", "2", "--out-dir", str(tmp_path), env=client_env)
    events = [line.split()[1] for line in result.stdout.splitlines()]
    assert events == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert {p.name for p in tmp_path.iterdir()} == {"partial_0.png", "partial_1.png", "final.png"}
    assert image(tmp_path / "final.png").size == (64, 64)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed on this machine")
def test_curl_example(server, tmp_path):
    env = {**ENV, "GFDIT_API_KEY": API_KEY, "OUT_DIR": str(tmp_path)}
    result = run_example("bash", str(ROOT / "examples/online/curl.sh"), server.url, "tiny-pixart", env=env)
    assert '"status": "ok"' in result.stdout or '"status":"ok"' in result.stdout
    assert '"id":"tiny-pixart"' in result.stdout.replace(" ", "")
    assert image(tmp_path / "curl_fox.png").size == (256, 256)
    assert result.stdout.splitlines()[-2:] == ["event: image_generation.partial_image",
                                                "event: image_generation.completed"]


def test_async_engine_example(tmp_path):
    result = run_example(sys.executable, str(ROOT / "examples/offline/async_engine.py"), "--out-dir", str(tmp_path),
                         "--steps", "2", "--model", "tiny-flux")
    assert {p.name for p in tmp_path.iterdir()} == {"async_1.png", "async_2.png", "async_3.png"}
    assert image(tmp_path / "async_3.png").size == (256, 256)
    assert "'a very slow one': aborted; unfinished requests: 0" in result.stdout
