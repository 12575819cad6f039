"""Step caching across 2 worker processes: at degree 2 for a whole request, and with the
degree changing every step so the cache migrates with the state both ways.

The reference is the same request alone on one in-process adapter with the same cache:
the members must agree on every decision (the cached step counts match) and give its
latents.
"""

import asyncio

import numpy as np
import pytest
import pytest_asyncio

from engine import AsyncEngine, EngineConfig, ImageParams
from engine.executor.multiproc import MultiprocExecutor
from engine.messages import Stage
from engine.models.loader import load_adapter
from engine.params import Limits, StepCache
from engine.scheduler.policies import make_policy
from tests.engine.executor.degree_script import DegreeCycle
from tests.helpers import record_tasks

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300), pytest.mark.slow]

REQUESTS = [
    ("a red fox", dict(seed=21, num_inference_steps=8, guidance_scale=4.0, width=64, height=64,
                       cache=StepCache(threshold=1.0, max_cached_steps=2))),
    ("a lighthouse at dusk", dict(seed=22, num_inference_steps=7, guidance_scale=2.0, width=96, height=64, n=2,
                                  cache=StepCache(threshold=1.0, max_cached_steps=1))),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["tiny-pixart", "tiny-flux", "tiny-qwen-image"])
async def engine(request):
    config = EngineConfig.create(model=request.param, device="cpu", num_workers=2, policy="static",
                                 static_degree=2, max_batch_size=4)
    executor = MultiprocExecutor(config, worker_hook="tests.engine.executor.degree_script:forbid_new_group")
    engine = AsyncEngine(config, executor)
    await engine.start()
    yield engine
    await engine.shutdown()


@pytest.fixture(scope="module")
def references(engine):
    adapter = load_adapter(engine.model_info.name, device="cpu")
    out = []
    for prompt, kw in REQUESTS:
        params = ImageParams(**kw).resolve(adapter.info(), Limits())
        (cond, uncond), = adapter.encode([prompt], [params])
        state = adapter.prepare("r", params, cond, uncond)
        while not state.done:
            adapter.denoise([state])
        out.append((state.latents.numpy(), state.cached_steps))
    return out


async def generate_all(engine):
    async def one(prompt, kw):
        params = ImageParams(output_format="raw", return_latents=True, **kw)
        return [o async for o in engine.generate(prompt, params)][-1]

    tasks = record_tasks(engine)
    try:
        outputs = await asyncio.gather(*(one(p, kw) for p, kw in REQUESTS))
    finally:
        del engine.executor.submit
    return outputs, [task for task, _ in tasks]


def assert_references(outputs, references):
    for out, (latents, cached) in zip(outputs, references):
        assert cached > 0 and out.cached_steps == cached
        assert np.abs(out.latents - latents).max() <= 1e-4


async def test_cached_requests_at_degree_two(engine, references):
    engine.scheduler.policy = make_policy("static", static_degree=2)
    outputs, tasks = await generate_all(engine)
    assert {t.group for t in tasks if t.stage == Stage.DENOISE} == {(0, 1)}
    assert_references(outputs, references)


async def test_the_cache_migrates_with_the_state(engine, references):
    engine.scheduler.policy = DegreeCycle()
    outputs, tasks = await generate_all(engine)
    moves = [(m.src, m.dsts) for t in tasks for m in t.migrations]
    assert (0, (1,)) in moves and (1, (0,)) in moves
    assert_references(outputs, references)
    assert engine.executor.healthy
