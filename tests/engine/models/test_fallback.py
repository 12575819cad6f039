"""The whole-pipeline fallback: a family with no adapter (SANA) served through the engine.

Checked against the plain SanaPipeline (latents <= 1e-4, pixels <= 1), with progress after
every step, abort between steps, and a pipeline call that fails or ends early.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import pytest_asyncio

from engine import (
    AsyncEngine,
    ImageParams,
    InvalidParamsError,
    RequestAbortedError,
    RequestFailedError,
)
from engine.messages import Stage
from tests.helpers import assert_matches_pipeline, record_tasks

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

SANA = "tiny-sana"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine():
    engine = await AsyncEngine.create(model=SANA, device="cpu", executor="inprocess")
    yield engine
    await engine.shutdown()


def params(**kw) -> ImageParams:
    return ImageParams(width=64, height=64, output_format="raw", return_latents=True, **kw)


async def test_the_model_says_it_runs_whole_and_the_scheduler_needs_nothing_else(engine):
    info = engine.model_info
    assert info.family == "diffusers" and info.backend == "pipeline"
    assert not info.step_batching and not info.sequence_parallel and not info.state_transfer
    assert engine.scheduler.degrees == (1,)
    a, b = (info.batch_key(ImageParams(width=64, height=64, guidance_scale=4.5), rid) for rid in ("a", "b"))
    assert a != b  # no two requests share a pipeline call


async def test_interleaved_requests_give_the_plain_pipelines_images(engine, preset_pipelines):
    """A higher-priority request arrives while another is mid-way: their calls interleave."""
    requests = [("a red fox", params(seed=1, num_inference_steps=8)),
                ("a blue cat in the city", params(seed=2, num_inference_steps=3, guidance_scale=2.0, n=2,
                                                  negative_prompt="blurry", priority=1)),
                ("a tree", params(seed=3, num_inference_steps=4, guidance_scale=1.0))]
    tasks = record_tasks(engine)
    progress: dict[int, list[int]] = {}
    first_is_midway = asyncio.Event()

    async def run(i):
        prompt, p = requests[i]
        if i:
            await first_is_midway.wait()
        outs = []
        async for out in engine.generate(prompt, p):
            outs.append(out)
            if i == 0 and out.step == 2:
                first_is_midway.set()
        progress[i] = [out.step for out in outs]
        return outs[-1]

    try:
        outputs = await asyncio.gather(*(run(i) for i in range(len(requests))))
    finally:
        del engine.executor.submit
    for i, ((prompt, _), out) in enumerate(zip(requests, outputs)):
        assert_matches_pipeline(preset_pipelines(SANA), prompt, out)
        steps = out.params.num_inference_steps
        assert progress[i] == [0, *range(1, steps + 1), steps]  # encoded, every step, then the images
    denoise = [task for task, _ in tasks if task.stage == Stage.DENOISE]
    assert all(len(task.request_ids) == 1 and task.group == (0,) for task in denoise)
    order = [task.request_ids[0] for task in denoise]
    first, urgent = outputs[0].request_id, outputs[1].request_id
    assert order.index(urgent) < len(order) - 1 - order[::-1].index(first)  # the urgent one cut in


async def test_an_abort_between_steps_unwinds_the_call_and_the_next_request_is_unharmed(engine, preset_pipelines):
    worker = engine.executor._worker
    before = threading.active_count()
    stream = engine.generate("a red fox", params(seed=5, num_inference_steps=20))
    async for out in stream:
        if out.step == 2:
            break
    await stream.aclose()  # aborts between steps
    await engine.wait_until_idle(30)
    for _ in range(100):
        if not worker.states and threading.active_count() <= before:
            break
        await asyncio.sleep(0.05)
    assert worker.states == {}
    assert threading.active_count() <= before  # the paused call has unwound
    out = [o async for o in engine.generate("a red fox", params(seed=5, num_inference_steps=3))][-1]
    assert_matches_pipeline(preset_pipelines(SANA), "a red fox", out)


async def test_abort_by_id_ends_the_request(engine):
    seen = []

    async def consume():
        async for out in engine.generate("a cat", params(seed=6, num_inference_steps=30), request_id="victim"):
            seen.append(out.step)
            if out.step == 1:
                await engine.abort("victim")

    with pytest.raises(RequestAbortedError):
        await asyncio.wait_for(consume(), 60)
    assert seen and max(seen) < 30


async def test_partial_images_are_refused_naming_the_field(engine):
    with pytest.raises(InvalidParamsError) as info:
        await engine.generate("a cat", ImageParams(width=64, height=64, partial_images=1)).__anext__()
    assert info.value.param == "partial_images"
    with pytest.raises(InvalidParamsError) as info:
        await engine.generate("a cat", ImageParams(width=65, height=64)).__anext__()
    assert info.value.param == "width"


async def test_a_pipeline_that_raises_fails_its_request_and_the_engine_serves_on(engine, monkeypatch):
    adapter = engine.executor._worker.adapter

    def broken(*args, **kwargs):
        raise ValueError("the pipeline broke")

    monkeypatch.setattr(adapter, "_pipe_for_one_call", lambda: broken)
    with pytest.raises(RequestFailedError, match="the pipeline broke"):
        [o async for o in engine.generate("a cat", params(seed=7, num_inference_steps=2))]
    monkeypatch.undo()
    out = [o async for o in engine.generate("a cat", params(seed=7, num_inference_steps=2))][-1]
    assert out.finished
