"""The simulator: the real scheduler against a virtual clock, workers replaced by the cost model."""

import pytest

from engine.messages import Stage
from engine.scheduler.policies import make_policy
from engine.scheduler.policy import Plan, Policy
from engine.sim.experiment import PolicySpec, average, compare, run_policies, saturation_bound
from engine.sim.simulator import SharedDevice, SimulationStalled, Simulator
from engine.sim.workload import DEFAULT_CLASSES, Phase, RequestClass, WorkloadRequest, generate
from tests.scheduling_helpers import h20


def one(width=1536, steps=10, arrival=0.0, index=0, deadline_s=None):
    return WorkloadRequest(index, arrival, "L", width, width, steps, 1, deadline_s, seed=index, prompt="p")


@pytest.mark.parametrize("degree", [1, 2, 4])
def test_a_request_alone_takes_its_steps_at_its_degree(degree):
    cm = h20()
    result = Simulator(make_policy("static", static_degree=degree), cm, 4).run([one(steps=10, arrival=3.0)])
    [record] = result.records
    assert record.latency_s == pytest.approx(10 * cm.step_s(9216, 1, degree))
    assert result.denoise_steps_by_degree == {degree: 10}
    assert result.busy_s[0] == pytest.approx(record.latency_s)


def test_saturated_static_lanes_run_back_to_back():
    cm = h20()
    requests = [one(steps=5, index=i) for i in range(6)]
    result = Simulator(make_policy("static", static_degree=2), cm, 4).run(requests)
    step = cm.step_s(9216, 1, 2)
    assert sorted(r.latency_s for r in result.records) == pytest.approx([5 * step] * 2 + [10 * step] * 2 + [15 * step] * 2)
    assert result.metrics.throughput == pytest.approx(6 / (15 * step))
    assert result.utilisation == pytest.approx(1.0)


def test_every_migration_costs_its_time():
    """A scripted policy moves the request to the other rank before every step."""
    class PingPong(Policy):
        name = "ping-pong"

        def plan(self, view):
            if not view.requests:
                return []
            r = view.requests[0]
            if r.location is None:
                return [Plan(Stage.ENCODE, [r.request_id], (0,))]
            if r.denoised:
                return [Plan(Stage.DECODE, [r.request_id], r.location)]
            return [Plan(Stage.DENOISE, [r.request_id], (1 - r.location[0],))]

    cm = h20().with_migration(50.0)
    result = Simulator(PingPong(), cm, 2, degrees=(1, 2)).run([one(steps=4)])
    assert result.migrations == 4
    assert result.records[0].latency_s == pytest.approx(4 * cm.step_s(9216) + 4 * 0.05)


def test_a_seed_gives_one_result_and_jitter_changes_it():
    cm = h20()
    workload = generate(DEFAULT_CLASSES, cm, num_gpus=4, phases=[Phase(300, 0.9)], seed=5)

    def latencies(jitter, seed):
        sim = Simulator(make_policy("elastic", cost_model=cm), cm, 4, jitter=jitter, seed=seed)
        return [r.latency_s for r in sim.run(workload).records]

    assert latencies(0.1, 1) == latencies(0.1, 1)
    assert latencies(0.1, 1) != latencies(0.1, 2)
    assert latencies(0.0, 1) == latencies(0.0, 2)


def test_a_shared_device_runs_slower_for_its_window_and_telemetry_lets_a_policy_avoid_it():
    cm = h20()
    slow = SharedDevice(rank=0, start_s=0.0, end_s=100.0, speed=0.5)
    static = Simulator(make_policy("static", static_degree=1), cm, 1, speed=slow)
    early, late = static.run([one(steps=10, index=0), one(steps=10, index=1, arrival=200.0)]).records
    assert early.latency_s == pytest.approx(2 * 10 * cm.step_s(9216))
    assert late.latency_s == pytest.approx(10 * cm.step_s(9216))

    def run(observe):
        sim = Simulator(make_policy("elastic", cost_model=cm), cm, 4, speed=slow, observe=observe)
        return sim.run([one(steps=10)]).records[0].latency_s

    blind = run(None)
    aware = run(lambda t: {0: slow(0, t)})
    assert aware < blind  # told about rank 0, elastic builds its group without it


def test_a_policy_that_plans_nothing_is_reported():
    class Idle(Policy):
        name = "idle"

        def plan(self, view):
            return []

    with pytest.raises(SimulationStalled, match="idle left 1"):
        Simulator(Idle(), h20(), 2).run([one()])


def test_elastic_meets_the_targets_against_static_degree_4():
    """4 GPUs, H20 figures, S/M/L at load 1.1 (a short window; `gfdit simulate` runs an hour)."""
    cm = h20()
    workload = generate(DEFAULT_CLASSES, cm, num_gpus=4, phases=[Phase(600, 1.1)], seed=0)
    specs = [PolicySpec.parse(s) for s in ("static-1", "static-2", "static-4", "elastic")]
    results = {r.spec.label: r for r in run_policies(specs, cm, 4, workload)}
    ratios = compare(results["elastic"].to_dict(), results["static-4"].to_dict())
    assert ratios["slo_violation_x"] <= 0.1
    assert ratios["mean_latency_x"] <= 0.5
    best = results["elastic"].loaded.metrics.slo_attainment
    assert all(best > results[s].loaded.metrics.slo_attainment for s in ("static-1", "static-2", "static-4"))


def test_saturated_throughput_stays_under_what_the_profile_allows():
    cm = h20()
    small = [RequestClass("S", 512, 512, 1.0, 1.5, steps=10)]
    bound = saturation_bound(small, cm, 4, (1, 2, 4))
    assert bound == pytest.approx(4 * 0.172 / 0.155)
    workload = generate(small, cm, num_gpus=4, saturate=40, seed=0)
    specs = [PolicySpec.parse("static-4"), PolicySpec.parse("elastic")]
    results = run_policies(specs, cm, 4, [], workload)
    gain = compare(results[1].to_dict(), results[0].to_dict())["saturated_throughput_x"]
    assert 0.95 * bound <= gain <= bound * (1 + 1e-9)


@pytest.mark.slow
def test_elastic_and_edf_against_every_static_configuration_over_an_hour():
    cm = h20()
    workload = generate(DEFAULT_CLASSES, cm, num_gpus=4, phases=[Phase(3600, 1.1)], seed=0)
    saturated = generate(DEFAULT_CLASSES, cm, num_gpus=4, saturate=200, seed=0)
    specs = [PolicySpec.parse(s) for s in ("static-1", "static-2", "static-4", "edf", "elastic")]
    results = {r.spec.label: r for r in run_policies(specs, cm, 4, workload, saturated)}
    for name in ("edf", "elastic"):
        ratios = compare(results[name].to_dict(), results["static-4"].to_dict())
        assert ratios["slo_violation_x"] <= 0.1 and ratios["mean_latency_x"] <= 0.5
        assert ratios["saturated_throughput_x"] > 1.5
        assert all(results[name].loaded.metrics.slo_attainment > results[s].loaded.metrics.slo_attainment
                   for s in ("static-1", "static-2", "static-4"))


def test_figures_average_over_seeds_and_compare_by_their_means():
    runs = [{"slo_attainment": 0.9, "mean_latency_s": 10.0, "p95_latency_s": 30.0, "class_attainment": {"S": 1.0},
             "label": "x"},
            {"slo_attainment": 0.7, "mean_latency_s": 30.0, "p95_latency_s": float("nan"),
             "class_attainment": {"S": 0.5}, "label": "x"}]
    mean = average(runs)
    assert mean == {"slo_attainment": pytest.approx(0.8), "mean_latency_s": 20.0, "p95_latency_s": 30.0,
                    "class_attainment": {"S": 0.75}, "label": "x"}
    base = {"slo_attainment": 0.0, "mean_latency_s": 200.0, "p95_latency_s": 60.0, "saturated_throughput": 1.0}
    ratios = compare({**mean, "saturated_throughput": 2.5}, base)
    assert ratios == pytest.approx({"slo_violation_x": 0.2, "mean_latency_x": 0.1, "p95_latency_x": 0.5,
                                    "saturated_throughput_x": 2.5})
