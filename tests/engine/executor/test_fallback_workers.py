"""The whole-pipeline fallback on two worker processes: data parallel, and a worker killed mid-call."""

import asyncio
import os
import signal

import pytest
import pytest_asyncio

from engine import AsyncEngine, ImageParams
from engine.messages import Stage
from tests.helpers import assert_matches_pipeline, record_tasks

# Two worker processes each building the pipeline: slow on a small CPU (pytest -m slow).
pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300), pytest.mark.slow]

SANA = "tiny-sana"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine():
    engine = await AsyncEngine.create(model=SANA, device="cpu", num_workers=2)
    yield engine
    await engine.shutdown()


async def final(engine, prompt, params):
    return [o async for o in engine.generate(prompt, params)][-1]


def params(seed: int, steps: int) -> ImageParams:
    return ImageParams(seed=seed, num_inference_steps=steps, width=64, height=64, output_format="raw",
                       return_latents=True)


async def test_two_workers_run_calls_at_once_and_a_killed_one_restarts_its_request(engine, preset_pipelines):
    executor = engine.executor
    old_pids = executor.worker_pids()
    tasks = record_tasks(engine)
    lost: list[str] = []
    submit = executor.submit

    def submit_then_kill(task):
        submit(task)
        if not lost and task.stage == Stage.DENOISE and task.group == (1,):
            lost.extend(task.request_ids)
            os.kill(old_pids[1], signal.SIGKILL)  # mid-call: the worker is stepping the pipeline

    executor.submit = submit_then_kill
    prompts = [f"a fox number {i}" for i in range(4)]
    try:
        outputs = await asyncio.wait_for(asyncio.gather(
            *(final(engine, p, params(20 + i, 5)) for i, p in enumerate(prompts)), return_exceptions=True), 240)
    finally:
        del executor.submit
    assert lost, "no denoise task ran on worker 1"
    assert not any(isinstance(out, BaseException) for out in outputs), outputs
    assert {task.group for task, _ in tasks if task.stage == Stage.DENOISE} == {(0,), (1,)}
    for prompt, out in zip(prompts, outputs):
        assert_matches_pipeline(preset_pipelines(SANA), prompt, out)
    # No state ever moved between the workers: the fallback's calls stay where they started.
    assert not any(task.migrations for task, _ in tasks)
