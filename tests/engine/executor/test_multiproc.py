"""Two worker processes behind one engine: the pipeline's images, data parallelism, failures.

The tests share one engine (starting worker processes costs seconds); they run in file
order, and the last one shuts it down.
"""

import asyncio
import contextlib
import os
import signal

import pytest
import pytest_asyncio

from engine import AsyncEngine, EngineConfig, ImageParams, RequestAbortedError, RequestFailedError
from engine.executor.multiproc import MultiprocExecutor
from engine.executor.worker_handle import WorkerHandle
from engine.messages import Stage, Task
from tests.engine.executor.faults import SEED_THAT_FAILS
from tests.engine.executor.procs import is_alive, our_segments, worker_children
from tests.helpers import STAGGERED, assert_matches_pipeline, record_tasks, run_staggered

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine():
    config = EngineConfig.create(model="tiny-pixart", device="cpu", num_workers=2, max_batch_size=4)
    # Small rings, so images and latents cross them in chunks.
    executor = MultiprocExecutor(config, worker_hook="tests.engine.executor.faults:fail_seed_666",
                                 ring_capacity=8192)
    engine = AsyncEngine(config, executor)
    await engine.start()
    yield engine
    await engine.shutdown()


@contextlib.contextmanager
def recording(engine):
    try:
        yield record_tasks(engine)
    finally:
        del engine.executor.submit  # back to the class's method


async def final(engine, prompt, params):
    return [o async for o in engine.generate(prompt, params)][-1]


async def test_two_workers_run_batches_at_once_and_give_the_pipeline_images(engine, preset_pipelines):
    assert engine.executor.world_epoch == 0 and len(engine.executor.worker_pids()) == 2
    with recording(engine) as tasks:
        outputs = await run_staggered(engine, STAGGERED)
    assert {task.group for task, _ in tasks if task.stage == Stage.DENOISE} == {(0,), (1,)}
    for out, (prompt, _) in zip(outputs, STAGGERED):
        assert out.finished and len(out.images) == out.params.n
        assert_matches_pipeline(preset_pipelines("tiny-pixart"), prompt, out)


async def test_a_raising_task_fails_only_its_requests_and_the_worker_stays_up(engine):
    pids = engine.executor.worker_pids()
    # Another shape, so the good requests never share the failing denoise batch.
    good = [asyncio.create_task(final(engine, "a fox", ImageParams(seed=s, num_inference_steps=3, width=64,
                                                                   height=128)))
            for s in (1, 2, 3)]
    with pytest.raises(RequestFailedError, match="out of memory"):
        await final(engine, "a cat", ImageParams(seed=SEED_THAT_FAILS, num_inference_steps=3, width=64, height=64))
    assert all(o.finished for o in await asyncio.gather(*good))
    assert engine.executor.worker_pids() == pids and engine.executor.healthy
    assert (await final(engine, "a cat", ImageParams(seed=5, num_inference_steps=2, width=64, height=64))).finished


async def test_a_task_larger_than_the_command_ring_crosses_it_in_pieces(engine, monkeypatch):
    flushes = []
    flush = WorkerHandle._flush
    monkeypatch.setattr(WorkerHandle, "_flush", lambda self: (flushes.append(self.rank), flush(self))[1])
    prompts = [f"{i} " + "a very long prompt about a red fox in the snow " * 120 for i in range(3)]
    assert sum(map(len, prompts)) > 2 * 8192
    params = ImageParams(num_inference_steps=2, width=64, height=64)
    outputs = await asyncio.gather(*(final(engine, p, params) for p in prompts))
    assert all(o.finished for o in outputs) and flushes


async def test_an_aborted_request_is_freed_in_its_worker_process(engine):
    executor = engine.executor
    located = {}
    with pytest.raises(RequestAbortedError):
        async for out in engine.generate("a fox", ImageParams(num_inference_steps=200, width=64, height=64),
                                         request_id="victim"):
            if out.step == 2:
                located["rank"] = engine.scheduler.requests["victim"].location[0]
                await engine.abort("victim")
    while "victim" in engine.scheduler.requests or engine._dispatch_pending:
        await asyncio.sleep(0.01)  # its running step came back and the free went out
    # Ask the worker to step the aborted request: it must no longer hold its state.
    answers: asyncio.Queue = asyncio.Queue()
    deliver = executor._on_result
    executor._on_result = answers.put_nowait
    try:
        executor.submit(Task(task_id=10**9, stage=Stage.DENOISE, request_ids=["victim"], group=(located["rank"],)))
        result = await asyncio.wait_for(answers.get(), 30)
    finally:
        executor._on_result = deliver
    assert result.task_id == 10**9 and result.items[0].error.startswith("no state for request victim")


async def test_a_worker_killed_mid_step_is_replaced_and_every_request_ends(engine, preset_pipelines):
    executor = engine.executor
    old_pids, epoch = executor.worker_pids(), executor.world_epoch
    lost: list[str] = []
    submit = executor.submit

    def submit_then_kill(task):
        submit(task)
        if not lost and task.stage == Stage.DENOISE and task.group == (1,):
            lost.extend(task.request_ids)
            os.kill(old_pids[1], signal.SIGKILL)  # it is reading the task or computing the step

    executor.submit = submit_then_kill
    prompts = [f"a fox number {i}" for i in range(6)]
    params = [ImageParams(seed=100 + i, num_inference_steps=10, width=128, height=128, output_format="raw",
                          return_latents=True) for i in range(6)]
    try:
        results = await asyncio.wait_for(asyncio.gather(
            *(final(engine, p, q) for p, q in zip(prompts, params)), return_exceptions=True), 120)
    finally:
        del executor.submit
    assert lost, "no denoise task ran on worker 1"
    for out in results:
        assert not isinstance(out, BaseException), out
        assert out.finished
    # A lost request started over (max_retries=1) and still gives the pipeline's image.
    prompt, out = next((p, o) for p, o in zip(prompts, results) if o.request_id in lost)
    assert_matches_pipeline(preset_pipelines("tiny-pixart"), prompt, out)

    async def replaced():
        while 1 in engine.scheduler.dead:
            await asyncio.sleep(0.1)

    await asyncio.wait_for(replaced(), 180)
    new_pids = executor.worker_pids()
    assert new_pids[0] == old_pids[0] and new_pids[1] != old_pids[1] and not is_alive(old_pids[1])
    assert executor.world_epoch == epoch + 1  # every worker joined a new world with the newcomer
    with recording(engine) as tasks:
        later = await asyncio.gather(*(final(engine, f"later {i}", ImageParams(seed=i, num_inference_steps=3,
                                                                             width=64, height=64))
                                       for i in range(4)))
    assert all(o.finished for o in later)
    assert {task.group for task, _ in tasks} == {(0,), (1,)}


async def test_shutdown_leaves_no_worker_process_and_no_segment(engine):
    pids = list(engine.executor.worker_pids().values())
    assert len(pids) == 2 and worker_children()
    await engine.shutdown()
    assert not any(is_alive(pid) for pid in pids)
    assert worker_children() == []
    assert our_segments(os.getpid()) == []
