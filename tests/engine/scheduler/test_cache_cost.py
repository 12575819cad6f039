"""What a step-cached image-step costs the scheduler: per-row accounting at each request's
measured hit rate, in the cost model, the deadline book and the simulator."""

from __future__ import annotations

import pytest

from engine.messages import ItemResult
from engine.params import ImageParams, StepCache
from engine.request import Request
from engine.scheduler.cost_model import DEFAULT_CACHED_STEP_COST, CostModel
from engine.scheduler.policies import make_policy
from engine.scheduler.profile import Point, Profile, ProfileError
from engine.sim.simulator import Simulator
from engine.sim.workload import WorkloadRequest
from tests.scheduling_helpers import MODEL, h20

POINTS = (Point("denoise", 512, 512, 1, 1, 30.0), Point("denoise", 512, 512, 4, 1, 90.0),
          Point("denoise", 1024, 1024, 1, 1, 110.0), Point("denoise", 1024, 1024, 4, 1, 410.0))


def test_cached_images_cost_their_share_of_the_per_image_work():
    cm = CostModel(Profile("m", 16, 10, POINTS, cached_step_cost=0.2))
    tokens = cm.tokens(512, 512)
    fixed = cm.fit("denoise").coef[0] / 1e3
    base = cm.step_s(tokens, 4)
    assert cm.step_s(tokens, 4, cached=0.5) == pytest.approx(fixed + (base - fixed) * (1 - 0.5 * 0.8))
    assert cm.step_s(tokens, 4, cached=1.0) == pytest.approx(fixed + (base - fixed) * 0.2)
    assert CostModel(Profile("m", 16, 10, POINTS)).cached_step_cost == DEFAULT_CACHED_STEP_COST
    profile = Profile.from_dict(Profile("m", 16, 10, POINTS, cached_step_cost=0.3).to_dict())
    assert profile.cached_step_cost == 0.3
    with pytest.raises(ProfileError, match="cached_step_cost"):
        Profile.from_dict({**profile.to_dict(), "cached_step_cost": 2})


def test_a_request_reports_its_measured_hit_rate():
    params = ImageParams(width=64, height=64, num_inference_steps=10, cache=StepCache())
    r = Request("r", "p", params, MODEL.batch_key(params), 0.0)
    assert r.cache_hit_rate == 0.0
    r.step, r.cached_steps = 6, 3
    assert r.cache_hit_rate == 0.5 and r.computed_steps == 3
    plain_params = ImageParams(width=64, height=64)
    plain = Request("q", "p", plain_params, MODEL.batch_key(plain_params), 0.0)
    assert plain.cache_hit_rate == 0.0
    assert ItemResult("r", 1).cached_steps == 0


def test_the_simulator_runs_cached_requests_faster_and_the_scheduler_learns_it():
    requests = [WorkloadRequest(i, 0.0, "S", 512, 512, 20, 1, None, seed=i, prompt="p") for i in range(4)]

    def run(rate):
        return Simulator(make_policy("edf", cost_model=h20()), h20(), 2, cache_hit_rate=rate).run(requests)

    plain, cached = run(0.0), run(0.5)
    assert cached.metrics.latency.mean < 0.8 * plain.metrics.latency.mean
    assert len(cached.records) == len(plain.records) == 4
