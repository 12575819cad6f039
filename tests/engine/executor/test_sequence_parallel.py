"""Sequence parallelism across 2 worker processes (gloo world + shared-memory collectives).

For every family: a request at degree 2 for its whole life, and one whose degree changes
every step (1, 2, 1, 2 ...) with its state migrating between the workers, both give the
plain pipeline's latents and images. ``torch.distributed.new_group`` raises in the workers
and in the engine's process, so no step may create a communicator.
"""

import asyncio

import pytest
import pytest_asyncio
import torch.distributed as dist

from engine import AsyncEngine, EngineConfig, ImageParams
from engine.executor.multiproc import MultiprocExecutor
from engine.messages import Stage
from engine.scheduler.policies import make_policy
from tests.engine.executor.degree_script import CYCLE, DegreeCycle
from tests.helpers import FAMILY_PRESETS, assert_matches_pipeline, record_tasks

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

REQUESTS = [
    ("a red fox", dict(seed=21, num_inference_steps=5, guidance_scale=4.0, width=64, height=64)),
    ("a lighthouse at dusk", dict(seed=22, num_inference_steps=6, guidance_scale=2.0, width=96, height=64, n=2)),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=FAMILY_PRESETS)
async def engine(request):
    config = EngineConfig.create(model=request.param, device="cpu", num_workers=2, policy="static",
                                 static_degree=2, max_batch_size=4)
    executor = MultiprocExecutor(config, worker_hook="tests.engine.executor.degree_script:forbid_new_group")
    engine = AsyncEngine(config, executor)
    await engine.start()
    yield engine
    await engine.shutdown()


@pytest.fixture(autouse=True)
def no_new_group_here(monkeypatch):
    def new_group(*args, **kwargs):
        raise AssertionError("torch.distributed.new_group was called in the engine's process")

    monkeypatch.setattr(dist, "new_group", new_group)


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


def assert_pipeline_images(pipe, outputs):
    for out, (prompt, _) in zip(outputs, REQUESTS):
        assert_matches_pipeline(pipe, prompt, out)


async def test_degree_two_for_a_whole_request_gives_the_pipeline_images(engine, preset_pipelines):
    engine.scheduler.policy = make_policy("static", static_degree=2)
    outputs, tasks = await generate_all(engine)
    denoise = [t for t in tasks if t.stage == Stage.DENOISE]
    assert denoise and {t.group for t in denoise} == {(0, 1)}
    assert all(not t.migrations for t in tasks)
    assert_pipeline_images(preset_pipelines(engine.model_info.name), outputs)


async def test_a_degree_changing_every_step_with_migrations_gives_the_pipeline_images(engine, preset_pipelines):
    engine.scheduler.policy = DegreeCycle()
    outputs, tasks = await generate_all(engine)
    for out in outputs:
        groups = [t.group for t in tasks if t.stage == Stage.DENOISE and out.request_id in t.request_ids]
        assert groups == [CYCLE[k % len(CYCLE)] for k in range(out.params.num_inference_steps)]
    moves = [(m.src, m.dsts) for t in tasks for m in t.migrations]
    assert (0, (1,)) in moves and (1, (0,)) in moves  # the state crossed in both directions
    assert_pipeline_images(preset_pipelines(engine.model_info.name), outputs)
    assert engine.executor.world_epoch == 0 and engine.executor.healthy
