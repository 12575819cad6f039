"""The ``cache`` request parameter: its forms, its bounds, the server default."""

from __future__ import annotations

import msgspec
import pytest

from engine.config import EngineConfig
from engine.params import (
    ImageParams,
    InvalidParamsError,
    Limits,
    StepCache,
    check_cache,
    check_cache_supported,
)
from entrypoints.batch_input import parse_line
from tests.scheduling_helpers import MODEL


def make_info(step_cache: bool = True):
    return msgspec.structs.replace(MODEL, step_cache=step_cache)


def test_forms_of_a_cache():
    assert StepCache.parse("fbcache:0.1") == StepCache(threshold=0.1)
    assert StepCache.parse("fbcache:0.1:5") == StepCache(threshold=0.1, max_cached_steps=5)
    assert StepCache.parse("none") is None
    assert check_cache({"method": "fbcache", "threshold": 0}) == StepCache(threshold=0.0)
    assert check_cache({"method": "none"}) is None and check_cache(None) is None


@pytest.mark.parametrize("bad", [
    {"method": "teacache", "threshold": 0.1}, {"method": "fbcache", "threshold": 1.5},
    {"method": "fbcache", "threshold": -0.1}, {"method": "fbcache", "threshold": "0.1"},
    {"method": "fbcache", "threshold": True}, {"method": "fbcache", "max_cached_steps": 0},
    {"method": "fbcache", "max_cached_steps": 2.5}, {"method": "fbcache", "bogus": 1}, "fbcache", 0.1,
    StepCache(threshold=float("nan")),
])
def test_bad_values_name_the_cache_param(bad):
    with pytest.raises(InvalidParamsError) as info:
        ImageParams(cache=bad).resolve(make_info(), Limits())  # type: ignore[arg-type]
    assert info.value.param == "cache"


def test_bad_flag_values_name_the_format():
    for bad in ("fbcache:x", "fbcache:2", "teacache:0.1"):
        with pytest.raises(InvalidParamsError, match="cache"):
            StepCache.parse(bad)
    with pytest.raises(ValueError, match="cache"):
        EngineConfig.create(cache="fbcache:high")


def test_the_server_default_applies_unless_the_request_says_otherwise():
    default = EngineConfig.create(cache="fbcache:0.2").model.step_cache
    assert default == StepCache(threshold=0.2)
    info, limits = make_info(), Limits()
    assert ImageParams().resolve(info, limits, default).cache == default
    own = StepCache(threshold=0.05)
    assert ImageParams(cache=own).resolve(info, limits, default).cache == own
    assert ImageParams(cache=StepCache(method="none")).resolve(info, limits, default).cache is None
    assert ImageParams().resolve(info, limits).cache is None


def test_a_model_without_a_step_cache_refuses_one():
    params = ImageParams(cache=StepCache()).resolve(make_info(), Limits())
    with pytest.raises(InvalidParamsError) as info:
        check_cache_supported(params, make_info(step_cache=False))
    assert info.value.param == "cache"
    check_cache_supported(params, make_info(step_cache=True))


def test_batch_lines_take_a_cache():
    job = parse_line('{"prompt": "a fox", "cache": {"method": "fbcache", "threshold": 0.1}}', 1)
    assert job.error is None and ImageParams.resolve(job.params, make_info(), Limits()).cache == StepCache(
        threshold=0.1)
    job = parse_line('{"prompt": "a fox", "cache": "none"}', 2)
    assert job.params.resolve(make_info(), Limits(), StepCache()).cache is None
