"""Qwen-Image and Z-Image schedule invariance through the engine: staggered requests of
different prompt lengths, seeds, steps and guidance give the plain pipeline's images

- loaded from a saved folder (save_pretrained, then the engine's from_pretrained);
- on 2 worker processes at sequence-parallel degree 2, batched;
- on 2 worker processes with the degree cycling 1, 2, 1, 2 and the state migrating.
"""

import pytest
import pytest_asyncio

from engine import AsyncEngine, EngineConfig
from engine.executor.multiproc import MultiprocExecutor
from engine.messages import Stage
from engine.scheduler.policies import make_policy
from tests.engine.executor.degree_script import CYCLE, DegreeCycle
from tests.engine.models.test_adapters_qwen import QWEN_REQUESTS, Z_REQUESTS
from tests.helpers import assert_matches_pipeline, record_tasks, run_staggered

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(600)]

REQUESTS = {"tiny-qwen-image": QWEN_REQUESTS[:4], "tiny-z-image": Z_REQUESTS[:4]}
FAMILY = {"tiny-qwen-image": "qwen-image", "tiny-z-image": "z-image"}


@pytest.mark.parametrize("preset", list(REQUESTS))
async def test_a_saved_folder_serves_the_pipeline_images(preset, preset_pipelines, tmp_path):
    pipe = preset_pipelines(preset)
    pipe.save_pretrained(tmp_path / preset)
    engine = await AsyncEngine.create(model=str(tmp_path / preset), device="cpu", executor="inprocess")
    try:
        assert engine.model_info.family == FAMILY[preset]
        tasks = record_tasks(engine)
        outputs = await run_staggered(engine, REQUESTS[preset])
    finally:
        await engine.shutdown()
    assert any(len(set(steps)) > 1 for task, steps in tasks if task.stage == Stage.DENOISE)
    for out, (prompt, _) in zip(outputs, REQUESTS[preset]):
        assert_matches_pipeline(pipe, prompt, out)


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=list(REQUESTS))
async def engine(request):
    config = EngineConfig.create(model=request.param, device="cpu", num_workers=2, policy="static",
                                 static_degree=2, max_batch_size=8)
    executor = MultiprocExecutor(config, worker_hook="tests.engine.executor.degree_script:forbid_new_group")
    engine = AsyncEngine(config, executor)
    await engine.start()
    yield engine
    await engine.shutdown()


async def test_staggered_requests_batched_at_degree_two_give_the_pipeline_images(engine, preset_pipelines):
    name = engine.model_info.name
    engine.scheduler.policy = make_policy("static", static_degree=2, batch=True)
    tasks = record_tasks(engine)
    try:
        outputs = await run_staggered(engine, REQUESTS[name])
    finally:
        del engine.executor.submit
    denoise = [(task, steps) for task, steps in tasks if task.stage == Stage.DENOISE]
    assert {task.group for task, _ in denoise} == {(0, 1)}
    assert any(len(set(steps)) > 1 for _, steps in denoise), "no batch mixed requests at different steps"
    for out, (prompt, _) in zip(outputs, REQUESTS[name]):
        assert_matches_pipeline(preset_pipelines(name), prompt, out)


async def test_degrees_cycling_with_migrations_give_the_pipeline_images(engine, preset_pipelines):
    name = engine.model_info.name
    engine.scheduler.policy = DegreeCycle()
    tasks = record_tasks(engine)
    try:
        outputs = await run_staggered(engine, REQUESTS[name])
    finally:
        del engine.executor.submit
    for out in outputs:
        groups = [t.group for t, _ in tasks if t.stage == Stage.DENOISE and out.request_id in t.request_ids]
        assert groups == [CYCLE[k % len(CYCLE)] for k in range(out.params.num_inference_steps)]
    assert {(m.src, m.dsts) for t, _ in tasks for m in t.migrations} >= {(0, (1,)), (1, (0,))}
    for out, (prompt, _) in zip(outputs, REQUESTS[name]):
        assert_matches_pipeline(preset_pipelines(name), prompt, out)
    assert engine.executor.world_epoch == 0 and engine.executor.healthy
