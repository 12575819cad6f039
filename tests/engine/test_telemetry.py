"""Telemetry with a scripted fake NVML, and the real NVML absent on this machine."""

import logging
import time

from engine.telemetry import DeviceStats, FakeSource, Reading, Telemetry, TelemetrySampler

GiB = 1 << 30


def devices(count=2):
    return [DeviceStats(i, memory_used=10 * GiB, memory_total=80 * GiB, gpu_util=50.0, memory_util=20.0,
                        processes={1000 + i: 10 * GiB}) for i in range(count)]


def test_foreign_processes_appear_for_the_scripted_window():
    script = [Reading(device=1, start=5.0, end=10.0, memory_used=40 * GiB, gpu_util=100.0,
                      processes={1001: 10 * GiB, 4242: 30 * GiB})]
    telemetry = Telemetry(FakeSource(devices(), script), our_pids=lambda: [1000, 1001])
    before = telemetry.sample(1.0)
    assert before.foreign == {0: [], 1: []} and before.foreign_util == {}
    during = telemetry.sample(6.0)
    assert during.foreign[1] == [4242] and during.devices[1].free_memory == 40 * GiB
    assert during.foreign_util[1] > 50.0
    for t in range(7, 10):
        telemetry.sample(float(t))
    assert telemetry.latest.foreign_util[1] > 90.0  # sustained foreign load: the average rises
    after = telemetry.sample(11.0)
    assert after.foreign[1] == [] and 1 not in after.foreign_util


def test_a_failing_source_is_reported_once_and_gives_no_devices(caplog):
    class Broken:
        def read(self, now):
            raise RuntimeError("GPU fell off the bus")

    telemetry = Telemetry(Broken())
    with caplog.at_level(logging.WARNING):
        assert telemetry.sample(1.0).devices == {}
        assert telemetry.sample(2.0).devices == {}
    assert sum("GPU fell off the bus" in r.message for r in caplog.records) == 1


def test_without_nvml_the_sampler_says_so_once_and_reports_nothing(caplog):
    with caplog.at_level(logging.INFO):
        sampler = TelemetrySampler.from_nvml(our_pids=lambda: [])
        sampler.start()
        sampler.stop()
    assert not sampler.available
    assert sampler.snapshot().devices == {}
    assert sum("telemetry off" in r.message for r in caplog.records) == 1


def test_the_sampler_thread_publishes_snapshots():
    seen = []
    sampler = TelemetrySampler(Telemetry(FakeSource(devices(1))), period_s=0.01, on_sample=seen.append)
    sampler.start()
    deadline = time.monotonic() + 5
    while len(seen) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    sampler.stop()
    assert len(seen) >= 3 and sampler.snapshot().devices[0].gpu_util == 50.0
