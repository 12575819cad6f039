"""Step caching through the engine: counts in the outputs and in /metrics, the server
default, and the models that refuse a cache."""

from __future__ import annotations

import pytest

from engine import AsyncEngine, ImageParams, InvalidParamsError
from engine.metrics import EngineMetrics
from engine.params import StepCache

LOOSE = StepCache(threshold=1.0, max_cached_steps=2)


@pytest.fixture
async def engine():
    engine = await AsyncEngine.create(model="tiny-pixart", device="cpu", executor="inprocess",
                                      cache="fbcache:1.0:2")
    yield engine
    await engine.shutdown()


async def final(engine, **kw):
    params = ImageParams(width=64, height=64, num_inference_steps=8, seed=1, **kw)
    return [o async for o in engine.generate("a fox", params)][-1]


async def test_outputs_and_metrics_count_computed_and_cached_steps(engine):
    metrics = EngineMetrics(engine)
    own = await final(engine, cache=LOOSE)
    by_default = await final(engine)  # the server's --cache
    off = await final(engine, cache=StepCache(method="none"))
    assert own.params.cache == by_default.params.cache == LOOSE and off.params.cache is None
    # Steps 0 and 7 computed, at most two cached in a row: C c c C c c C C.
    assert (own.computed_steps, own.cached_steps) == (4, 4)
    assert (by_default.computed_steps, by_default.cached_steps) == (4, 4)
    assert (off.computed_steps, off.cached_steps) == (8, 0)

    def value(kind):
        return metrics.registry.get_sample_value("gfdit_request_steps_total", {"kind": kind})

    assert (value("computed"), value("cached")) == (16, 8)  # counted at each request's end
    await final(engine, cache=LOOSE)
    assert (value("computed"), value("cached")) == (20, 12)


async def test_z_image_refuses_a_cache_by_name():
    engine = await AsyncEngine.create(model="tiny-z-image", device="cpu", executor="inprocess",
                                      cache="fbcache:0.1")
    try:
        assert not engine.model_info.step_cache
        with pytest.raises(InvalidParamsError) as info:
            engine.resolve_params(ImageParams(cache=StepCache()))
        assert info.value.param == "cache"
        # The server's default does not apply where the model has no step cache.
        assert engine.resolve_params(ImageParams()).cache is None
    finally:
        await engine.shutdown()
