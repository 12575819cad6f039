"""One simulated GPU shared with a foreign job: telemetry-aware placement against a blind one."""

import pytest

from engine.scheduler.device_state import DeviceState
from engine.sim.experiment import PolicySpec, run_policies
from engine.sim.interference import Interference, SimulatedTelemetry
from engine.sim.workload import DEFAULT_CLASSES, Phase, generate
from tests.scheduling_helpers import h20


def test_the_scenario_is_parsed_and_checked():
    assert Interference.parse("1:600:1800") == Interference(1, 600.0, 1800.0, 100.0)
    assert Interference.parse("0:10:20:60").speed() == pytest.approx(0.7)
    for bad in ("1:600", "x:1:2", "1:20:10", "1:0:10:0", "1:0:10:150"):
        with pytest.raises(ValueError, match="interference"):
            Interference.parse(bad)


def test_simulated_telemetry_sees_the_foreign_job_in_its_window_up_to_a_period_late():
    spec = Interference(2, 100.2, 200.2, 100.0)
    observe = SimulatedTelemetry(spec.source(4), 4, period_s=0.5)
    assert observe(50.0) == DeviceState(time=50.0, rank_speed={}, interfered=frozenset(),
                                        foreign_processes={0: 0, 1: 0, 2: 0, 3: 0})
    assert observe(100.4).interfered == frozenset()  # shared since 100.2; the last sample is from 100.0
    state = observe(100.5)
    assert state.interfered == {2} and state.rank_speed == {2: 0.5} and state.time == 100.5
    assert state.free_memory == {} and state.nearly_full == frozenset()  # time is simulated, not memory
    assert observe(200.4).interfered == {2}  # free again since 200.2, seen at 200.5
    assert observe(200.5).interfered == frozenset()
    true_speed = spec.shared_device()
    assert true_speed(2, 150.0) == 0.5 and true_speed(2, 250.0) == 1.0 and true_speed(1, 150.0) == 1.0


def test_telemetry_aware_placement_keeps_more_deadlines_while_a_gpu_is_shared():
    cm = h20()
    workload = generate(DEFAULT_CLASSES, cm, num_gpus=4, phases=[Phase(600, 0.8)], seed=0)
    spec = Interference.parse("1:100:400")
    policies = [PolicySpec.parse("edf")]
    [blind] = run_policies(policies, cm, 4, workload, speed=spec.shared_device())
    [aware] = run_policies(policies, cm, 4, workload, speed=spec.shared_device(),
                           make_observe=lambda: SimulatedTelemetry(spec.source(4), 4))
    [clean] = run_policies(policies, cm, 4, workload)
    window = [spec.window_attainment(r.loaded.records) for r in (blind, aware, clean)]
    assert window[0] < window[1] <= window[2]
    assert blind.loaded.metrics.slo_attainment < aware.loaded.metrics.slo_attainment
