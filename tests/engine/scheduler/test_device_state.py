"""Telemetry snapshots -> the scheduler's device inputs (engine/scheduler/device_state.py)."""

import pytest

from engine.scheduler.device_state import DeviceState, InterferenceRules, device_state
from engine.telemetry import DeviceStats, FakeSource, GiB, Reading, Telemetry

OURS = [100, 101, 102]


def gpus(count=3, used=20 * GiB):
    return [DeviceStats(i, memory_used=used, memory_total=80 * GiB, gpu_util=90.0, memory_util=30.0,
                        processes={OURS[i]: used}) for i in range(count)]


def state_at(source, now, rank_devices=None):
    telemetry = Telemetry(source, our_pids=lambda: OURS)
    return device_state(telemetry.sample(now), rank_devices or {0: 0, 1: 1, 2: 2})


def test_no_telemetry_means_no_inputs():
    empty = DeviceState()
    assert not empty.known and not empty.interfered and not empty.rank_speed and not empty.free_memory


def test_a_foreign_job_marks_its_rank_interfered_and_derates_it_by_its_own_utilisation():
    # Our worker keeps device 1 busy at 100 %; the foreign job's own samples say 60 %.
    script = [Reading(1, 10.0, 20.0, gpu_util=100.0, processes={101: 20 * GiB, 7777: 10 * GiB},
                      process_util={101: 40.0, 7777: 60.0})]
    before = state_at(FakeSource(gpus(), script), 5.0)
    assert before.interfered == frozenset() and before.rank_speed == {}
    during = state_at(FakeSource(gpus(), script), 15.0)
    assert during.interfered == {1} and during.foreign_processes == {0: 0, 1: 1, 2: 0}
    assert during.rank_speed == {1: pytest.approx(1 - 0.5 * 0.6)}
    assert during.free_memory[1] == 60 * GiB and during.total_memory[0] == 80 * GiB


def test_an_idle_foreign_process_costs_no_speed_but_still_keeps_groups_away():
    script = [Reading(2, 0.0, 9.0, processes={102: 20 * GiB, 7777: 1 * GiB}, process_util={102: 95.0, 7777: 0.0})]
    state = state_at(FakeSource(gpus(), script), 1.0)
    assert state.interfered == {2} and state.rank_speed == {2: 1.0}


def test_without_per_process_samples_the_device_utilisation_is_the_foreign_load():
    script = [Reading(0, 0.0, 9.0, gpu_util=100.0, processes={100: 20 * GiB, 7777: 1 * GiB})]
    assert state_at(FakeSource(gpus(), script), 1.0).rank_speed == {0: 0.5}
    assert InterferenceRules().speed(100.0) == 0.5 and InterferenceRules(derate=1.0).speed(100.0) == 0.2


def test_a_nearly_full_device_is_marked_and_unmapped_devices_are_ignored():
    devices = gpus(2)
    devices[1] = DeviceStats(1, memory_used=78 * GiB, memory_total=80 * GiB, gpu_util=0.0, memory_util=0.0)
    state = state_at(FakeSource(devices), 1.0, rank_devices={0: 0, 1: 1, 2: 5})
    assert state.nearly_full == {1} and set(state.free_memory) == {0, 1}
    assert state.free_memory[1] == 2 * GiB
