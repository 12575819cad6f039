"""The scheduler with telemetry: interference moves groups, memory caps batches and new state.

Hand-made DeviceStates and TaskResults, no torch (the scheduler is pure)."""

import pytest

from engine.messages import ItemResult, Stage, TaskResult
from engine.scheduler.device_state import DeviceState
from engine.scheduler.memory import MemoryModel
from engine.scheduler.placement import pick_group
from engine.scheduler.policies import FCFSPolicy, make_policy
from engine.scheduler.policy import Plan, Policy
from engine.scheduler.scheduler import Scheduler
from engine.telemetry import GiB
from tests.scheduling_helpers import L, M, S, complete, h20, make_request, view

MiB = 1 << 20


def devices(free_gib, nearly_full=(), time=100.0, interfered=(), speed=None):
    free = {rank: int(f * GiB) for rank, f in enumerate(free_gib)}
    return DeviceState(time=time, rank_speed=speed or {}, interfered=frozenset(interfered), free_memory=free,
                       total_memory=dict.fromkeys(free, 80 * GiB), nearly_full=frozenset(nearly_full))


def answer(sched, task, activation_bytes, now=1.0, resident=10 * GiB):
    """What GPU workers answer: every member reports its measured memory, the leader the items."""
    items = []
    for rid in task.request_ids:
        r = sched.requests[rid]
        items.append(ItemResult(rid, 0 if task.stage == Stage.ENCODE else min(r.num_steps, r.step + task.num_steps)))
    for rank in task.members:
        sched.on_result(TaskResult(task.task_id, rank, items if rank == task.group[0] else [],
                                   peak_memory_bytes=resident + activation_bytes, start_memory_bytes=resident), now)


# ----- interference ----------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["edf", "elastic"])
def test_interference_on_one_device_moves_the_group_off_it(policy):
    """A request held by (0, 1): blind, it widens over all four ranks; with rank 1 shared
    with a foreign job, its group leaves rank 1 and keeps holder 0 (a migration to 2)."""
    sched = Scheduler(make_policy(policy, cost_model=h20()), 4, degrees=(1, 2, 4))
    held = make_request("held", steps=50, shape=L, location=(0, 1), step=10)
    sched.add_request(held)
    [blind] = sched.schedule(0.0).tasks
    assert blind.group == (0, 1, 2, 3)
    complete(sched, blind)

    sched = Scheduler(make_policy(policy, cost_model=h20()), 4, degrees=(1, 2, 4))
    sched.add_request(make_request("held", steps=50, shape=L, location=(0, 1), step=10))
    sched.devices = devices([40] * 4, interfered={1}, speed={1: 0.5})
    [aware] = sched.schedule(0.0).tasks
    assert aware.group == (0, 2) and 1 not in aware.members
    assert [(m.src, m.dsts) for m in aware.migrations] == [(0, (2,))]


def test_an_idle_foreign_process_alone_keeps_multi_rank_groups_away():
    """Rank 1 runs at full speed but hosts a foreign process: groups still take it last."""
    assert pick_group([0, 1, 2, 3], 2, holders=(0, 1), slow={1}) == (0, 2)
    assert pick_group([0, 1, 2, 3], 2, holders=(0, 1)) == (0, 1)
    assert pick_group([0, 1], 2, holders=(0, 1), slow={1}) == (0, 1)  # no other choice
    # A single rank stays with its holder; moving, it leaves for a fast rank.
    assert pick_group([1, 2], 1, holders=(1,), slow={1}) == (1,)
    assert pick_group([1, 2], 1, holders=(1,), slow={1}, may_move=True) == (2,)


def test_a_request_on_a_shared_device_that_would_miss_moves_off_it_and_its_holder_sends():
    cm = h20()
    late_there = make_request("r", steps=50, shape=L, location=(1,), step=10, deadline_s=60.0)
    v = view([late_there], [0, 1, 2, 3], rank_speed={1: 0.5})
    v.interfered = frozenset({1})
    [plan] = make_policy("edf", cost_model=cm).plan(v)
    assert 1 not in plan.group
    sched = Scheduler(make_policy("edf", cost_model=cm), 4, degrees=(1, 2, 4))
    sched.add_request(make_request("r", steps=50, shape=L, location=(1,), step=10, deadline_s=60.0))
    sched.devices = devices([40] * 4, interfered={1}, speed={1: 0.5})
    [task] = sched.schedule(0.0).tasks
    assert 1 not in task.group and task.migrations[0].src == 1 and 1 in task.members


def test_new_requests_with_tight_deadlines_are_not_encoded_on_a_slowed_device():
    cm = h20()
    tight = [make_request(f"s{i}", steps=50, shape=S, deadline_s=1.5 * 50 * cm.step_s(1024)) for i in range(2)]
    v = view(tight, [0, 1], num_workers=2, degrees=(1, 2), rank_speed={0: 0.5})
    plans = make_policy("edf", cost_model=cm).plan(v)
    assert {p.group for p in plans} == {(1,)} and all(p.stage == Stage.ENCODE for p in plans)
    v = view(tight, [0, 1], num_workers=2, degrees=(1, 2))
    assert {p.group for p in make_policy("edf", cost_model=cm).plan(v)} == {(0,), (1,)}


# ----- memory ---------------------------------------------------------------------------
def test_the_memory_model_learns_bytes_per_token_row_and_extrapolates_safely():
    model = MemoryModel(margin=1.0)
    assert model.activation_bytes(Stage.DENOISE, S, 1) is None and model.max_images(Stage.DENOISE, S, 1, GiB) is None
    # 512x512 with CFG: 1024 tokens x 2 rows per image; a batch of 2 used 4 MiB per unit... 4096 units.
    model.learn(Stage.DENOISE, S, 2, 1, 4096 * MiB)
    assert model.activation_bytes(Stage.DENOISE, S, 1) == 2048 * MiB
    assert model.activation_bytes(Stage.DENOISE, S, 4, degree=2) == 4096 * MiB  # Ulysses splits the sequence
    # Four times the tokens: per unit grows four times (attention may be quadratic) -> 16x per image.
    assert model.activation_bytes(Stage.DENOISE, M, 1) == 16 * 2048 * MiB
    assert model.max_images(Stage.DENOISE, S, 1, 9 * GiB) == 4
    model.learn(Stage.DENOISE, S, 1, 1, 4096 * MiB)  # a worse sample: the max wins
    assert model.activation_bytes(Stage.DENOISE, S, 1) == 4096 * MiB
    assert MemoryModel(margin=1.1).units(Stage.DECODE, S, 3) == 3 * 1024


def test_low_headroom_caps_the_batch_size():
    """One worker, 8 requests, 9 GiB free. Until a stage's memory is known each task runs
    one request; the measured peaks (2 GiB of activations per 512x512 image in a denoise
    step) then cap the denoise batch at 4 images, and more headroom lifts the cap."""
    sched = Scheduler(FCFSPolicy(), 1, max_batch_size=8, memory=MemoryModel(margin=1.0))
    for i in range(8):
        sched.add_request(make_request(f"r{i}", arrival=i * 0.01, steps=4, shape=S))
    sched.devices = devices([9])
    sizes = []
    peaks = {Stage.ENCODE: 64 * MiB, Stage.DENOISE: 2 * GiB}
    for _ in range(4):
        [task] = sched.schedule(1.0).tasks
        sizes.append((task.stage.name, len(task.request_ids)))
        answer(sched, task, peaks[task.stage] * len(task.request_ids))
    assert sizes == [("ENCODE", 1), ("DENOISE", 1), ("ENCODE", 7), ("DENOISE", 4)]
    sched.devices = devices([40])
    [task] = sched.schedule(2.0).tasks
    assert task.stage == Stage.DENOISE and len(task.request_ids) == 8


def test_memory_the_allocator_holds_counts_as_headroom_once_the_readings_are_newer():
    """A worker ends a task with 4 GiB reserved but unused by its allocator: with readings
    taken after that, they add to the device's 4 GiB free; older readings may predate
    them (the device's free memory then still held them), so they do not count."""
    sched = Scheduler(FCFSPolicy(), 1, max_batch_size=8, memory=MemoryModel(margin=1.0))
    sched.memory.learn(Stage.DENOISE, S, 1, 1, 2 * GiB)
    for i in range(6):
        sched.add_request(make_request(f"r{i}", steps=4, shape=S, location=(0,)))
    sched.devices = devices([4], time=40.0)
    [task] = sched.schedule(45.0).tasks
    assert len(task.request_ids) == 2
    sched.on_result(TaskResult(task.task_id, 0, [ItemResult(rid, 1) for rid in task.request_ids],
                               cached_memory_bytes=4 * GiB), now=50.0)
    [task] = sched.schedule(55.0).tasks
    assert len(task.request_ids) == 2
    sched.on_result(TaskResult(task.task_id, 0, [ItemResult(rid, 1) for rid in task.request_ids],
                               cached_memory_bytes=4 * GiB), now=60.0)
    sched.devices = devices([4], time=70.0)
    [task] = sched.schedule(75.0).tasks
    assert len(task.request_ids) == 4


def test_without_telemetry_nothing_is_capped():
    sched = Scheduler(FCFSPolicy(), 1, max_batch_size=8)
    sched.memory.learn(Stage.DENOISE, S, 1, 1, 100 * GiB)
    for i in range(8):
        sched.add_request(make_request(f"r{i}", steps=4, shape=S, location=(0,)))
    [task] = sched.schedule(0.0).tasks
    assert len(task.request_ids) == 8


@pytest.mark.parametrize("policy", ["fcfs", "srtf", "edf", "elastic"])
def test_a_nearly_full_rank_gets_no_new_requests(policy):
    """Rank 0's device is nearly full: new requests go to rank 1, rank 0 gets nothing."""
    def run(state):
        sched = Scheduler(make_policy(policy, cost_model=h20()), 3, degrees=(1,))
        sched.add_request(make_request("old", steps=4, shape=S, location=(2,), step=1))
        for i in range(3):
            sched.add_request(make_request(f"new{i}", arrival=1.0 + i, steps=4, shape=S))
        sched.devices = state
        return [(t.stage, t.group) for t in sched.schedule(2.0).tasks if t.stage == Stage.ENCODE]

    assert (Stage.ENCODE, (0,)) in run(devices([40, 40, 40]))
    encodes = run(devices([1, 40, 40], nearly_full={0}))
    assert encodes and all(0 not in group for _, group in encodes)


def test_static_lanes_on_a_nearly_full_device_take_no_new_requests():
    sched = Scheduler(make_policy("static", static_degree=1), 2)
    for i in range(2):
        sched.add_request(make_request(f"new{i}", arrival=i, steps=4, shape=S))
    sched.add_request(make_request("old", steps=4, shape=S, location=(1,), step=1))
    sched.devices = devices([1, 40], nearly_full={0})
    assert [(t.stage, t.group) for t in sched.schedule(0.0).tasks] == [(Stage.DENOISE, (1,))]
    sched = Scheduler(make_policy("static", static_degree=1), 2)
    sched.add_request(make_request("new0", steps=4, shape=S))
    sched.add_request(make_request("old", steps=4, shape=S, location=(1,), step=1))
    assert (Stage.ENCODE, (0,)) in [(t.stage, t.group) for t in sched.schedule(0.0).tasks]


def test_a_policy_that_encodes_on_a_nearly_full_rank_is_held_back_unless_nothing_else_can_free_memory():
    class Greedy(Policy):
        name = "greedy"

        def plan(self, view):
            return [Plan(Stage.ENCODE, [r.request_id for r in view.waiting()], (0,))]

    sched = Scheduler(Greedy(), 2)
    sched.add_request(make_request("old", steps=4, shape=S, location=(1,)))
    sched.add_request(make_request("new", steps=4, shape=S))
    sched.devices = devices([1, 40], nearly_full={0})
    assert sched.schedule(0.0).tasks == []  # "old" holds memory: its end frees some
    sched = Scheduler(Greedy(), 2)
    for i in range(3):
        sched.add_request(make_request(f"new{i}", steps=4, shape=S))
    sched.devices = devices([1, 1], nearly_full={0, 1})
    [task] = sched.schedule(0.0).tasks  # nothing of ours to wait for: one request runs
    assert task.request_ids == ["new0"]


def test_a_static_lane_with_an_interfered_device_takes_new_requests_last():
    def first_lane(state):
        sched = Scheduler(make_policy("static", static_degree=2), 4, degrees=(1, 2))
        sched.add_request(make_request("new", steps=4, shape=S))
        sched.devices = state
        [task] = sched.schedule(0.0).tasks
        return task.group

    assert first_lane(DeviceState()) == (0, 1)
    assert first_lane(devices([40] * 4, interfered={1})) == (2, 3)


def test_when_every_device_is_slowed_tight_requests_still_start():
    cm = h20()
    tight = make_request("s", steps=50, shape=S, deadline_s=1.5 * 50 * cm.step_s(1024))
    v = view([tight], [0, 1], num_workers=2, degrees=(1, 2), rank_speed={0: 0.5, 1: 0.5})
    assert [p.stage for p in make_policy("edf", cost_model=cm).plan(v)] == [Stage.ENCODE]
