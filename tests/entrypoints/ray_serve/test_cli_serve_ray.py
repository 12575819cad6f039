"""``gfdit serve`` and its replica flags: without ``--ray`` nothing changes and Ray is never
imported; the flags are checked with one-line errors; ``ReplicaOptions`` become Serve's
deployment options."""

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


def test_replica_options_become_serve_deployment_options():
    pytest.importorskip("ray.serve")
    from entrypoints.ray_serve.deployment import ReplicaOptions, replica_engine_options

    fixed = ReplicaOptions(num_replicas=3, workers_per_replica=4, gpus_per_worker=1, cpus_per_worker=2)
    options = fixed.deployment_options(max_batch_size=16)
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["max_ongoing_requests"] == 32  # twice the batch: full batches, no pile-up on one replica
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert options["placement_group_bundles"] == [{"CPU": 2, "GPU": 1}] * 4
    # The replica actor's own resources come out of the first bundle.
    assert options["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1}
    assert replica_engine_options({"model": "m"}, fixed) == {"model": "m", "num_workers": 4}

    scaled = ReplicaOptions(num_replicas=None, min_replicas=0, max_replicas=5, target_ongoing_requests=4)
    autoscaling = scaled.deployment_options(max_batch_size=8)["autoscaling_config"]
    assert (autoscaling.min_replicas, autoscaling.max_replicas, autoscaling.initial_replicas) == (0, 5, 1)
    assert autoscaling.target_ongoing_requests == 4
    assert scaled.bundles == [{"CPU": 1.0}]
    assert ReplicaOptions(max_ongoing_requests=5).deployment_options(8)["max_ongoing_requests"] == 5
    assert replica_engine_options({"model": "m"}, scaled) == {"model": "m", "num_workers": 1, "device": "cpu",
                                                              "worker_threads": 1}
