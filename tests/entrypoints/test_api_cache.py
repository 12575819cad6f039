"""The ``cache`` field over HTTP: a bad value is a 400 naming it; a good one is served."""

from __future__ import annotations

import openai
import pytest

from tests.entrypoints.conftest import API_KEY


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.mark.parametrize("cache", [
    {"method": "teacache", "threshold": 0.1}, {"method": "fbcache", "threshold": 2},
    {"method": "fbcache", "threshold": "low"}, {"method": "fbcache", "bogus": 1}, "fbcache",
    {"method": "fbcache", "max_cached_steps": 0},
])
def test_a_bad_cache_is_a_400_naming_it(client, cache):
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="a fox", size="64x64", extra_body={"cache": cache})
    assert info.value.body["param"] == "cache" and info.value.body["type"] == "invalid_request_error"


def test_a_cached_request_is_served_and_counted(client, server):
    before = server.metric("gfdit_request_steps_total", {"kind": "cached"})
    result = client.images.generate(prompt="a fox", size="64x64", extra_body={
        "num_inference_steps": 6, "seed": 2, "cache": {"method": "fbcache", "threshold": 1.0}})
    assert len(result.data) == 1
    # Steps 0 and 5 computed; 1-3 cached (the default bound, 3 in a row), 4 computed.
    assert server.metric("gfdit_request_steps_total", {"kind": "cached"}) - before == 3
