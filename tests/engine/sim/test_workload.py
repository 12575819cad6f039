"""Workloads: classes, Poisson arrivals at a target load, saturation, JSONL (no torch)."""

import pytest

from engine.sim.workload import (
    DEFAULT_CLASSES,
    Phase,
    RequestClass,
    generate,
    load_jsonl,
    offered_load,
    save_jsonl,
    single_gpu_latency_s,
)
from tests.scheduling_helpers import h20


def test_classes_and_phases_parse():
    assert RequestClass.parse("S:512x512:0.5:1.5") == RequestClass("S", 512, 512, 0.5, 1.5)
    assert RequestClass.parse("X:256") == RequestClass("X", 256, 256)
    assert RequestClass.parse("W:768x512:2:-:8") == RequestClass("W", 768, 512, 2.0, None, 8)
    for bad in ("S", ":512", "S:abc", "S:512:x"):
        with pytest.raises(ValueError, match="expected NAME:WxH"):
            RequestClass.parse(bad)
    assert Phase.parse_list("600:0.5,300:1.5") == [Phase(600, 0.5), Phase(300, 1.5)]


@pytest.mark.parametrize("load", [0.3, 1.1])
def test_the_offered_load_is_the_target_load(load):
    cm = h20()
    requests = generate(DEFAULT_CLASSES, cm, num_gpus=4, phases=[Phase(1800, load)], seed=3)
    largest = max(single_gpu_latency_s(c, cm, cm.default_steps) for c in DEFAULT_CLASSES)
    assert offered_load(requests, cm, 4, 1800) == pytest.approx(load, abs=largest / (4 * 1800))
    arrivals = [r.arrival_s for r in requests]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0 and arrivals[-1] < 1800


def test_deadlines_are_alpha_times_the_single_gpu_latency_and_classes_follow_their_weights():
    cm = h20()
    requests = generate(DEFAULT_CLASSES, cm, num_gpus=4, phases=[Phase(7200, 1.0)], seed=1)
    for c in DEFAULT_CLASSES:
        mine = [r for r in requests if r.label == c.name]
        assert {(r.width, r.height) for r in mine} == {(c.width, c.height)}
        expected = c.alpha * 50 * cm.step_s(cm.tokens(c.width, c.height))
        assert all(r.deadline_s == pytest.approx(expected) for r in mine)
        assert len(mine) / len(requests) == pytest.approx(c.weight, abs=0.06)
    assert len({r.seed for r in requests}) == len(requests)


def test_a_seed_gives_one_workload():
    cm = h20()
    one = generate(DEFAULT_CLASSES, cm, num_gpus=4, phases=[Phase(600, 1.0)], seed=7)
    assert one == generate(DEFAULT_CLASSES, cm, num_gpus=4, phases=[Phase(600, 1.0)], seed=7)
    assert one != generate(DEFAULT_CLASSES, cm, num_gpus=4, phases=[Phase(600, 1.0)], seed=8)


def test_piecewise_phases_and_saturation():
    cm = h20()
    requests = generate(DEFAULT_CLASSES, cm, num_gpus=4, phases=[Phase(1800, 0.3), Phase(1800, 1.2)], seed=2)
    quiet = sum(r.arrival_s < 1800 for r in requests)
    assert (len(requests) - quiet) / quiet == pytest.approx(4.0, rel=0.35)
    saturated = generate(DEFAULT_CLASSES, cm, num_gpus=4, saturate=50, steps=10, seed=2)
    assert len(saturated) == 50 and {r.arrival_s for r in saturated} == {0.0} and {r.steps for r in saturated} == {10}
    with pytest.raises(ValueError, match="weights"):
        generate([RequestClass("S", 512, 512, 0.0)], cm, num_gpus=1, saturate=1)


def test_workloads_round_trip_through_jsonl(tmp_path):
    cm = h20()
    requests = generate(DEFAULT_CLASSES, cm, num_gpus=2, phases=[Phase(300, 0.8)], seed=0)
    save_jsonl(requests, tmp_path / "w.jsonl")
    assert load_jsonl(tmp_path / "w.jsonl") == requests
