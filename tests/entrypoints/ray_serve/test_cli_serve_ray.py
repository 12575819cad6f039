"""``gfdit serve`` and its replica flags: without ``--ray`` nothing changes and Ray is never
imported; the flags are checked with one-line errors."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request

import pytest

from entrypoints.cli import main


def test_serve_without_ray_serves_and_never_imports_ray(tmp_path):
    imports = tmp_path / "imports.txt"
    with imports.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "entrypoints.cli", "serve", "tiny-pixart", "--device", "cpu",
             "--executor", "inprocess", "--port", "0"],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            for line in proc.stdout:
                if found := re.search(r"gfdit: serving .* on (http://\S+)", line):
                    break
            else:
                pytest.fail(f"the server exited:\n{imports.read_text()[-3000:]}")
            request = urllib.request.Request(
                found.group(1) + "/v1/images/generations", method="POST",
                data=b'{"prompt": "a fox", "size": "64x64", "num_inference_steps": 2}',
                headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as reply:
                assert reply.status == 200 and "X-Gfdit-Replica" not in reply.headers
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
        finally:
            proc.kill()
            proc.wait()
    modules = [line.rsplit("|", 1)[-1].strip() for line in imports.read_text().splitlines()
               if line.startswith("import time:")]
    assert "aiohttp" in modules and "engine.async_engine" in modules  # the log is whole
    assert not [m for m in modules if m == "ray" or m.startswith("ray.")]


@pytest.mark.parametrize("flags", [["--replicas", "2"], ["--min-replicas", "1", "--max-replicas", "2"],
                                   ["--ray-address", "auto"]])
def test_replica_flags_without_ray_are_refused_in_one_line(flags):
    with pytest.raises(SystemExit, match="need --ray"):
        main(["serve", "tiny-pixart", *flags])


def test_fixed_and_autoscaled_replicas_are_exclusive():
    pytest.importorskip("ray.serve")
    with pytest.raises(SystemExit, match="either --replicas or --min-replicas"):
        main(["serve", "--ray", "--device", "cpu", "--replicas", "2", "--max-replicas", "3"])
    with pytest.raises(SystemExit, match="min replicas <= max replicas"):
        main(["serve", "--ray", "--device", "cpu", "--min-replicas", "3", "--max-replicas", "2"])
