"""GPU telemetry through the real server: scripted readings in /metrics, the engine serving."""

from __future__ import annotations

import json
import os
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.telemetry import DeviceStats, FakeSource, GiB
from entrypoints.api_server import ServerConfig
from tests.entrypoints.conftest import ServerThread

FOREIGN = 4242


@pytest.fixture(scope="module")
def server():
    """One in-process worker (this process) on a scripted 80 GiB device that a foreign
    process shares at 60 % of the SMs."""
    device = DeviceStats(0, memory_used=30 * GiB, memory_total=80 * GiB, gpu_util=85.0, memory_util=25.0,
                         processes={os.getpid(): 20 * GiB, FOREIGN: 10 * GiB},
                         process_util={os.getpid(): 25.0, FOREIGN: 60.0}, name="Scripted GPU", power_w=310.5,
                         temperature_c=61.0, sm_clock_mhz=1755, throttle_reasons=4)
    server = ServerThread(ServerConfig(port=0), telemetry_source=FakeSource([device]), telemetry_period_s=0.05)
    yield server
    server.close()


def scrape(server) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_readings_appear_in_metrics(server):
    samples = scrape(server)
    device = (("device", "0"),)
    assert samples[("gfdit_device_memory_used_bytes", device)] == 30 * GiB
    assert samples[("gfdit_device_memory_total_bytes", device)] == 80 * GiB
    assert samples[("gfdit_device_gpu_utilization_percent", device)] == 85.0
    assert samples[("gfdit_device_memory_utilization_percent", device)] == 25.0
    assert samples[("gfdit_device_power_watts", device)] == 310.5
    assert samples[("gfdit_device_temperature_celsius", device)] == 61.0
    assert samples[("gfdit_device_sm_clock_mhz", device)] == 1755
    assert samples[("gfdit_device_throttle_reasons", device)] == 4
    assert samples[("gfdit_device_foreign_processes", device)] == 1  # our own pid is not foreign
    rank = (("device", "0"), ("rank", "0"))
    assert samples[("gfdit_rank_speed", rank)] == pytest.approx(1 - 0.5 * 0.6)
    assert samples[("gfdit_rank_interfered", rank)] == 1
    assert samples[("gfdit_rank_free_memory_bytes", rank)] == 50 * GiB


def test_the_engine_serves_under_telemetry(server):
    body = json.dumps({"prompt": "a fox", "size": "64x64", "n": 2, "num_inference_steps": 3}).encode()
    request = urllib.request.Request(server.url + "/v1/images/generations", body,
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        assert reply.status == 200 and len(json.load(reply)["data"]) == 2
    # The scheduler saw the readings: one worker, interfered, with 50 GiB of headroom.
    state = server.call(lambda: server.engine.scheduler.devices)
    assert state.interfered == {0} and state.free_memory == {0: 50 * GiB}
    assert server.call(server.engine.device_summary).startswith("devices: 0 Scripted GPU 80.0 GiB (30.0 used")
