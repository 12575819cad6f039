"""Failures after which a worker must not go on: it leaves, is replaced, the world re-forms.

Two real worker processes. A fault hook (faults.fail_once_like_a_gpu) raises once: a
sticky CUDA error in a single-rank step, and an error on one rank of a degree-2 step while
its peer waits in the step's collectives. Either way the worker that raised exits with
EXIT_REPLACE_ME instead of running the next task on a device or communicator it can no
longer trust; the engine replaces it, forms a new world, and the requests start over and
give the pipeline's images. The steps follow degree_script.CYCLE: 1, 2, 1, 2 ...
"""

import os

import pytest
import pytest_asyncio

from engine import AsyncEngine, EngineConfig, ImageParams
from engine.executor.multiproc import MultiprocExecutor
from tests.helpers import assert_matches_pipeline

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tmp_path_factory):
    fault_dir = tmp_path_factory.mktemp("faults")
    os.environ["GFDIT_TEST_FAULT_DIR"] = str(fault_dir)  # the workers inherit it
    config = EngineConfig.create(model="tiny-pixart", device="cpu", num_workers=2,
                                 policy="tests.engine.executor.degree_script:DegreeCycle", max_retries=1)
    executor = MultiprocExecutor(config, worker_hook="tests.engine.executor.faults:fail_once_like_a_gpu")
    executor.restart_backoff_s = 0.0
    engine = AsyncEngine(config, executor)
    await engine.start()
    engine.fault_dir = fault_dir
    yield engine
    await engine.shutdown()
    del os.environ["GFDIT_TEST_FAULT_DIR"]


async def final(engine, prompt, params):
    return [o async for o in engine.generate(prompt, params)][-1]


async def run_with_fault(engine, fault: str, seed: int):
    pids, epoch = engine.executor.worker_pids(), engine.executor.world_epoch
    (engine.fault_dir / fault).touch()
    params = ImageParams(seed=seed, num_inference_steps=4, width=64, height=64, output_format="raw",
                         return_latents=True)
    out = await final(engine, "a red fox", params)
    assert not (engine.fault_dir / fault).exists(), "the fault never fired"
    return out, pids, epoch


async def test_a_sticky_cuda_error_makes_the_worker_leave_and_be_replaced(engine, preset_pipelines):
    out, pids, epoch = await run_with_fault(engine, "cuda-error", seed=31)
    now = engine.executor.worker_pids()
    assert now[0] != pids[0] and now[1] == pids[1]  # rank 0 raised in a single-rank step, and left
    assert engine.executor.world_epoch == epoch + 1 and engine.executor.healthy
    assert_matches_pipeline(preset_pipelines("tiny-pixart"), "a red fox", out)  # the retry's image


async def test_a_failed_multi_rank_step_re_forms_the_world_instead_of_going_on(engine, preset_pipelines):
    out, pids, epoch = await run_with_fault(engine, "multi-rank", seed=32)
    now = engine.executor.worker_pids()
    # The rank that raised left; its peer saw it go (CPU channels) and stayed.
    assert now[1] != pids[1] and now[0] == pids[0]
    assert engine.executor.world_epoch == epoch + 1 and engine.executor.healthy
    assert_matches_pipeline(preset_pipelines("tiny-pixart"), "a red fox", out)
    # The new world carries degree-2 steps and migrations again.
    later = await final(engine, "a blue cat", ImageParams(seed=33, num_inference_steps=4, width=64, height=64,
                                                          output_format="raw", return_latents=True))
    assert_matches_pipeline(preset_pipelines("tiny-pixart"), "a blue cat", later)
