"""The executor's book of worker replacement and world re-formation, with fake worker processes.

Fast and deterministic: each fake records what the executor sends it, and the test plays
the workers' answers and deaths in the orders that matter.
"""

import asyncio

import pytest

from engine import EngineConfig
from engine.executor import multiproc, world_formation
from engine.executor.multiproc import MultiprocExecutor
from engine.executor.protocol import Joined, JoinFailed, JoinWorld, to_worker_decoder
from engine.executor.worker_handle import WorkerStartError
from engine.messages import ModelInfo, Stage, Task, TaskResult
from engine.model_info import LatentSpec

INFO = ModelInfo(name="fake", family="pixart", default_width=64, default_height=64, default_steps=2,
                 default_guidance=4.5, latent=LatentSpec(channels=4, spatial_compression=8, patch_size=2),
                 max_size=256, num_heads=2, guidance="cfg",
                 device="cpu", dtype="float32")


class FakeHandle:
    pids = iter(range(1000, 2000))

    def __init__(self, executor: MultiprocExecutor, rank: int) -> None:
        loop = asyncio.get_running_loop()
        self.executor, self.rank, self.pid = executor, rank, next(self.pids)
        self.serving, self.alive = False, True
        self.ready, self.exited = loop.create_future(), loop.create_future()
        self.got: list = []

    def send(self, payload: bytes) -> None:
        self.got.append(to_worker_decoder.decode(payload))

    def kill(self) -> None:
        if self.alive:
            self.alive = False
            if not self.ready.done():
                self.ready.set_exception(WorkerStartError("killed while starting"))
                self.ready.exception()
            self.exited.set_result(-9)
            self.executor._on_exit(self)

    exit_reason = "worker was killed by SIGKILL"

    def joins(self) -> list[int]:
        return [m.epoch for m in self.got if isinstance(m, JoinWorld)]

    def tasks(self) -> list[int]:
        return [m.task_id for m in self.got if isinstance(m, Task)]


class Harness:
    """An executor over fakes, started (epoch 0 formed), and the callbacks it made."""

    def __init__(self, num_workers: int) -> None:
        self.executor = ex = MultiprocExecutor(EngineConfig.create(device="cpu", num_workers=num_workers))
        ex.restart_backoff_s = 0.0
        self.results, self.failures, self.restarts = [], [], []
        ex._loop = asyncio.get_running_loop()
        ex._on_result, ex._on_failure, ex._on_restart = self.results.append, self._failed, self.restarts.append
        ex._world.formed = ex._loop.create_future()
        self.spawned: list[FakeHandle] = []
        ex._spawn = self.spawn
        ex._handles = [self.spawn(rank) for rank in range(num_workers)]
        for handle in ex._handles:
            handle.ready.set_result(INFO)
        ex._maybe_form_world()
        for handle in ex._handles:
            ex._on_message(handle, Joined(0))
        assert ex._world.formed.done() and ex.world_epoch == 0
        for handle in ex._handles:
            handle.serving = True

    def _failed(self, rank: int, message: str) -> None:
        self.failures.append((rank, message))

    def spawn(self, rank: int) -> FakeHandle:
        handle = FakeHandle(self.executor, rank)
        self.spawned.append(handle)
        return handle

    def handle(self, rank: int) -> FakeHandle:
        return self.executor._handles[rank]

    def answer(self, rank: int, task_id: int) -> None:
        self.executor._on_message(self.handle(rank), TaskResult(task_id, rank))

    def join(self, rank: int, epoch: int, ok: bool = True) -> None:
        message = Joined(epoch) if ok else JoinFailed(epoch, "timed out")
        self.executor._on_message(self.handle(rank), message)


def task(task_id: int, *group: int) -> Task:
    return Task(task_id=task_id, stage=Stage.DENOISE, request_ids=[f"r{task_id}"], group=group)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_the_world_reforms_only_between_multi_rank_tasks_and_holds_new_ones():
    h = Harness(3)
    ex = h.executor
    ex.submit(task(1, 0, 1))
    h.handle(2).kill()
    assert h.failures == [(2, "worker was killed by SIGKILL while running this request")]
    await settle()
    newcomer = h.handle(2)
    assert newcomer is h.spawned[-1] and newcomer.got == []
    ex.submit(task(2, 0, 1))  # multi-rank: held until the new world has formed
    ex.submit(task(3, 0))  # single-rank: goes at once
    assert h.handle(0).tasks() == [1, 3] and h.handle(1).tasks() == [1]
    newcomer.ready.set_result(INFO)
    await settle()
    assert h.handle(0).joins() == [0]  # task 1 still runs on the old world
    h.answer(0, 1)
    h.answer(1, 1)
    assert [hd.joins() for hd in ex._handles] == [[0, 1], [0, 1], [1]]
    h.join(0, 1)
    h.join(2, 1)
    assert h.restarts == [] and h.handle(0).tasks() == [1, 3]
    h.join(1, 1)
    assert h.restarts == [2] and newcomer.serving
    # Task 2 follows JoinWorld(1) in every member's queue.
    for rank in (0, 1):
        got = h.handle(rank).got
        assert got.index(next(m for m in got if isinstance(m, JoinWorld) and m.epoch == 1)) < \
            got.index(next(m for m in got if isinstance(m, Task) and m.task_id == 2))
    assert ex.healthy and ex.world_epoch == 1


async def test_a_rank_that_dies_while_the_world_forms_moves_it_to_the_next_epoch():
    h = Harness(3)
    ex = h.executor
    h.handle(1).kill()
    await settle()
    h.handle(1).ready.set_result(INFO)
    await settle()
    assert [hd.joins()[-1] for hd in ex._handles] == [1, 1, 1]
    h.join(0, 1)
    h.handle(1).kill()  # the newcomer dies before joining: the others' rendezvous times out
    assert h.failures == [(1, "worker was killed by SIGKILL while running this request")]  # once
    await settle()
    h.handle(1).ready.set_result(INFO)
    await settle()
    assert h.handle(1).joins() == []  # rank 2 has not answered epoch 1 yet
    h.join(2, 1, ok=False)
    assert [hd.joins()[-1] for hd in ex._handles] == [2, 2, 2]
    for rank in range(3):
        h.join(rank, 2)
    assert h.restarts == [1] and ex.healthy and ex.world_epoch == 2


async def test_a_replacement_that_never_starts_makes_the_executor_give_up(monkeypatch):
    monkeypatch.setattr(multiproc, "MAX_START_ATTEMPTS", 2)
    h = Harness(2)
    h.handle(0).kill()
    for _ in range(2):
        await settle()
        h.handle(0).ready.set_exception(WorkerStartError("could not load model 'x': boom"))
        await settle()
    assert not h.executor.healthy
    assert h.failures[-1][0] == 0 and "could not be restarted after 2 attempts" in h.failures[-1][1]
    assert all(not hd.alive for hd in h.spawned[2:])  # every failed replacement was killed


@pytest.mark.parametrize("fail_joins", [1, world_formation.MAX_JOIN_FAILURES])
async def test_failed_joins_are_retried_then_the_executor_gives_up(fail_joins):
    h = Harness(2)
    ex = h.executor
    h.handle(1).kill()
    await settle()
    h.handle(1).ready.set_result(INFO)
    await settle()
    for epoch in range(1, 1 + fail_joins):
        h.join(0, epoch, ok=False)
        h.join(1, epoch, ok=False)
    if fail_joins >= world_formation.MAX_JOIN_FAILURES:
        assert not ex.healthy and "failed 3 times to form" in h.failures[-1][1]
    else:
        h.join(0, fail_joins + 1)
        h.join(1, fail_joins + 1)
        assert ex.healthy and h.restarts == [1]


async def test_on_nccl_the_peers_of_a_dead_rank_in_its_task_are_killed_not_left_waiting():
    h = Harness(3)
    ex = h.executor
    ex._on_gpu = True  # the world's collectives run over NCCL
    ex.submit(task(1, 0, 1))
    ex.submit(task(2, 2))
    peer, bystander = h.handle(0), h.handle(2)
    h.handle(1).kill()
    # Rank 0 waits in NCCL transfers with rank 1: only the watchdog would end them.
    assert not peer.alive and bystander.alive
    assert {rank for rank, _ in h.failures} == {0, 1}
    await settle()
    for rank in (0, 1):
        h.handle(rank).ready.set_result(INFO)
    await settle()
    h.answer(2, 2)
    assert [hd.joins()[-1] for hd in ex._handles] == [1, 1, 1]
    for rank in range(3):
        h.join(rank, 1)
    assert sorted(h.restarts) == [0, 1] and ex.healthy


async def test_on_cpu_the_peers_of_a_dead_rank_stay_they_see_the_death_themselves():
    h = Harness(2)
    h.executor.submit(task(1, 0, 1))
    h.handle(1).kill()
    assert h.handle(0).alive and h.failures == [(1, "worker was killed by SIGKILL while running this request")]


async def test_a_rank_that_never_answers_join_world_is_killed_and_the_world_moves_on():
    h = Harness(2)
    ex = h.executor
    ex.join_timeout_s, ex.join_grace_s = 0.05, 0.0
    h.handle(1).kill()
    await settle()
    h.handle(1).ready.set_result(INFO)
    await settle()
    stuck = h.handle(0)
    h.join(1, 1)  # rank 0 never answers epoch 1 (stuck leaving a world whose peer died)
    await asyncio.sleep(0.2)
    assert not stuck.alive
    await settle()
    h.handle(0).ready.set_result(INFO)
    await settle()
    assert [hd.joins()[-1] for hd in ex._handles] == [2, 2]
    h.join(0, 2)
    h.join(1, 2)
    assert sorted(h.restarts) == [0, 1] and ex.healthy and ex.world_epoch == 2
