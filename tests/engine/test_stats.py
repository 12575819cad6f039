"""The engine's observer hook (engine/stats.py): every task and every request end, reported."""

from __future__ import annotations

import asyncio

import pytest

from engine import AsyncEngine, ImageParams, RequestAbortedError
from engine.messages import Stage
from engine.request import RequestStatus


class Recorder:
    def __init__(self) -> None:
        self.tasks = []
        self.requests = []

    def on_task(self, stats):
        self.tasks.append(stats)

    def on_request(self, stats):
        self.requests.append(stats)


class Broken:
    def on_task(self, stats):
        raise RuntimeError("broken observer")

    def on_request(self, stats):
        raise RuntimeError("broken observer")


@pytest.fixture
async def engine():
    engine = await AsyncEngine.create(model="tiny-pixart", device="cpu", executor="inprocess", steps_per_task=2)
    yield engine
    await engine.shutdown()


async def final(engine, params, prompt="a fox"):
    return [o async for o in engine.generate(prompt, params)][-1]


async def test_observers_see_every_task_and_every_request_end(engine):
    recorder = Recorder()
    engine.add_observer(Broken())  # a failing observer is logged, never fails a request
    engine.add_observer(recorder)
    outputs = await asyncio.gather(final(engine, ImageParams(n=2, num_inference_steps=3, width=64, height=64)),
                                   final(engine, ImageParams(num_inference_steps=3, width=64, height=64)))
    assert all(o.finished for o in outputs)
    stages = [t.stage for t in recorder.tasks]
    assert stages.count(Stage.DECODE) >= 1 and stages.count(Stage.ENCODE) >= 1
    denoise = [t for t in recorder.tasks if t.stage == Stage.DENOISE]
    # steps_per_task=2 over 3 steps: chunks of 2 then 1 (the steps a task really ran), so
    # whatever the batching, the image-steps add up to 3 images x 3 steps.
    assert sum(t.images * t.num_steps for t in denoise) == 9
    assert {t.num_steps for t in denoise} == {1, 2}
    assert all(t.degree == 1 and t.elapsed_s > 0 and not t.failed for t in recorder.tasks)
    encoded = sum(t.images for t in recorder.tasks if t.stage == Stage.ENCODE)
    decoded = sum(t.images for t in recorder.tasks if t.stage == Stage.DECODE)
    assert encoded == decoded == 3
    ends = {r.request_id: r for r in recorder.requests}
    assert set(ends) == {o.request_id for o in outputs}
    for out in outputs:
        end = ends[out.request_id]
        assert end.status == RequestStatus.FINISHED and end.images == out.params.n
        assert end.latency_s == pytest.approx(out.metrics.latency)
        assert 0 <= end.queue_wait_s <= end.latency_s


async def test_aborted_and_failed_requests_are_reported(engine):
    recorder = Recorder()
    engine.add_observer(recorder)
    with pytest.raises(RequestAbortedError):
        async for out in engine.generate("a fox", ImageParams(num_inference_steps=200, width=64, height=64),
                                         request_id="victim"):
            if out.step >= 2:
                await engine.abort("victim")
    worker = engine.executor._worker

    def lost(states):
        raise RuntimeError("device lost")

    worker.adapter.denoise = lost
    with pytest.raises(Exception, match="device lost"):
        await final(engine, ImageParams(num_inference_steps=3, width=64, height=64))
    statuses = [r.status for r in recorder.requests]
    assert statuses == [RequestStatus.ABORTED, RequestStatus.FAILED]
    assert all(r.images == 0 for r in recorder.requests)
    assert any(t.failed and t.stage == Stage.DENOISE for t in recorder.tasks)
