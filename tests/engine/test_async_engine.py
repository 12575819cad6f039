"""The asyncio engine end to end with the in-process worker (tests/engine/executor/ covers the
worker processes)."""

import asyncio

import numpy as np
import pytest

from engine import (
    AsyncEngine,
    ImageParams,
    InvalidParamsError,
    RequestAbortedError,
    RequestFailedError,
)
from engine.messages import Stage
from tests.helpers import (
    FAMILY_PRESETS,
    STAGGERED,
    assert_matches_pipeline,
    pipeline_reference,
    record_tasks,
    run_staggered,
)


@pytest.mark.parametrize("preset", FAMILY_PRESETS)
async def test_staggered_requests_share_batches_and_match_the_pipeline(preset, preset_pipelines):
    engine = await AsyncEngine.create(model=preset, device="cpu", executor="inprocess")
    try:
        tasks = record_tasks(engine)
        outputs = await run_staggered(engine, STAGGERED)
    finally:
        await engine.shutdown()
    mixed = [steps for task, steps in tasks if task.stage == Stage.DENOISE and len(set(steps)) > 1]
    assert mixed, "no denoise batch mixed requests at different steps"
    pipe = preset_pipelines(preset)
    for out, (prompt, _) in zip(outputs, STAGGERED):
        assert_matches_pipeline(pipe, prompt, out)


async def test_a_model_saved_to_a_folder_serves_the_same_images(tmp_path, preset_pipelines):
    pipe = preset_pipelines("tiny-flux")
    pipe.save_pretrained(tmp_path / "flux")
    engine = await AsyncEngine.create(model=str(tmp_path / "flux"), device="cpu", executor="inprocess")
    try:
        assert engine.model_info.family == "flux"
        outputs = await run_staggered(engine, STAGGERED[:3])
    finally:
        await engine.shutdown()
    for out, (prompt, _) in zip(outputs, STAGGERED):
        ref_latents, _ = pipeline_reference(pipe, prompt, out.params)
        assert np.abs(out.latents - ref_latents.numpy()).max() <= 1e-4


@pytest.fixture
async def engine():
    engine = await AsyncEngine.create(model="tiny-pixart", device="cpu", executor="inprocess")
    yield engine
    await engine.shutdown()


async def test_progress_counts_every_step_then_the_final_output(engine):
    outputs = [out async for out in engine.generate("a fox", ImageParams(num_inference_steps=4, width=64, height=64))]
    assert [o.step for o in outputs] == [0, 1, 2, 3, 4, 4]
    assert [o.finished for o in outputs] == [False] * 5 + [True]
    final = outputs[-1]
    assert final.images[0].format == "png" and final.images[0].to_pil().size == (64, 64)
    assert final.seed == final.params.seed and final.metrics.latency > 0


@pytest.mark.parametrize("bad, param", [
    (dict(n=0), "n"), (dict(n=11), "n"), (dict(width=70), "width"), (dict(height=0), "height"),
    (dict(num_inference_steps=0), "num_inference_steps"), (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(seed=-3), "seed"), (dict(output_format="gif"), "output_format"), (dict(partial_images=4), "partial_images"),
    (dict(width=8192), "width"), (dict(output_compression=101), "output_compression"),
])
async def test_invalid_params_raise_a_clear_error_and_the_engine_goes_on(engine, bad, param):
    with pytest.raises(InvalidParamsError) as info:
        async for _ in engine.generate("a fox", ImageParams(**bad)):
            pass
    assert info.value.param == param
    assert engine.num_unfinished == 0
    outputs = [o async for o in engine.generate("a fox", ImageParams(num_inference_steps=2, width=64, height=64))]
    assert outputs[-1].finished


@pytest.mark.parametrize("prompt", ["", "   ", 42, "x" * 9000])
async def test_bad_prompts_are_refused(engine, prompt):
    with pytest.raises(InvalidParamsError) as info:
        async for _ in engine.generate(prompt, ImageParams()):
            pass
    assert info.value.param == "prompt"


async def test_abort_ends_the_request_and_frees_its_state(engine):
    params = ImageParams(num_inference_steps=200, width=64, height=64)
    with pytest.raises(RequestAbortedError):
        async for out in engine.generate("a fox", params, request_id="victim"):
            if out.step == 2:
                await engine.abort("victim")
    await asyncio.sleep(0.05)
    assert engine.executor._worker.states == {}
    assert engine.num_unfinished == 0 and not engine.scheduler.requests


async def test_cancelling_the_consumer_aborts_the_request(engine):
    steps = []

    async def consume():
        async for out in engine.generate("a fox", ImageParams(num_inference_steps=200, width=64, height=64)):
            steps.append(out.step)

    task = asyncio.create_task(consume())
    while len(steps) < 3:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    assert engine.executor._worker.states == {} and not engine.scheduler.requests


async def test_mixed_shapes_all_finish_and_never_share_a_batch(engine):
    tasks = record_tasks(engine)
    sizes = [(64, 64), (128, 64), (64, 64), (64, 128), (128, 64), (64, 64)]

    async def one(i, size):
        params = ImageParams(width=size[0], height=size[1], num_inference_steps=5, seed=i)
        return [o async for o in engine.generate(f"prompt {i}", params)][-1]

    outputs = await asyncio.gather(*(one(i, s) for i, s in enumerate(sizes)))
    assert [o.images[0].to_pil().size for o in outputs] == sizes
    by_id = {o.request_id: o.params for o in outputs}
    for task, _ in tasks:
        if task.stage != Stage.ENCODE:
            assert len({(by_id[r].width, by_id[r].height) for r in task.request_ids}) == 1


async def test_a_failing_task_fails_only_its_requests(engine):
    worker = engine.executor._worker
    real_denoise = worker.adapter.denoise

    def denoise(states):
        if any(s.params.seed == 666 for s in states):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_denoise(states)

    worker.adapter.denoise = denoise
    good = asyncio.create_task(_final(engine, ImageParams(seed=1, num_inference_steps=3, width=64, height=128)))
    with pytest.raises(RequestFailedError, match="out of memory"):
        await _final(engine, ImageParams(seed=666, num_inference_steps=3, width=64, height=64))
    assert (await good).finished
    assert worker.states == {}


async def _final(engine, params):
    return [o async for o in engine.generate("a fox", params)][-1]


def test_the_default_executor_is_one_worker_process_on_a_cpu():
    from engine import EngineConfig
    from engine.async_engine import make_executor
    from engine.executor.inprocess import InProcessExecutor
    from engine.executor.multiproc import MultiprocExecutor

    executor = make_executor(EngineConfig.create(device="cpu"))
    assert isinstance(executor, MultiprocExecutor) and executor.num_workers == 1
    assert make_executor(EngineConfig.create(device="cpu", num_workers=3)).num_workers == 3
    # torch threads per CPU worker: torch's default alone, 1 each when several share the cores.
    assert executor._threads is None
    assert make_executor(EngineConfig.create(device="cpu", num_workers=2))._threads == 1
    assert make_executor(EngineConfig.create(device="cpu", num_workers=2, worker_threads=3))._threads == 3
    assert isinstance(make_executor(EngineConfig.create(executor="inprocess")), InProcessExecutor)
    with pytest.raises(ValueError, match="exactly one worker"):
        make_executor(EngineConfig.create(executor="inprocess", num_workers=2))
    with pytest.raises(ValueError, match="unknown executor"):
        make_executor(EngineConfig.create(executor="threads"))
