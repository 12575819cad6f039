"""edf and elastic on hand-made views and through the real scheduler with a fake clock (no torch)."""

import pytest

from engine.messages import Stage, TaskResult
from engine.scheduler.cost_model import CostModel
from engine.scheduler.edf import EDFPolicy
from engine.scheduler.elastic import ElasticPolicy
from engine.scheduler.policies import make_policy
from engine.scheduler.profile import Point, Profile
from engine.scheduler.scheduler import Scheduler, UpdateKind
from tests.scheduling_helpers import L, M, S, batching_model, complete, h20, make_request, view


def plans_by_request(plans):
    return {rid: (p.stage, p.group) for p in plans for rid in p.request_ids}


@pytest.mark.parametrize("deadline_s, group", [(30.0, (0, 1, 2, 3)), (50.0, (0, 1)), (100.0, (0,))])
def test_edf_runs_a_request_at_the_smallest_degree_that_meets_its_deadline(deadline_s, group):
    """50 steps of 1536x1536 take 77.9 s at degree 1, 44 s at 2, 23.2 s at 4."""
    big = make_request("big", steps=50, shape=L, deadline_s=deadline_s, location=(0,))
    smalls = [make_request(f"s{i}", arrival=1.0, steps=50, deadline_s=200.0, location=(i,)) for i in (1, 2, 3)]
    plans = plans_by_request(EDFPolicy(h20()).plan(view([big, *smalls], [0, 1, 2, 3])))
    assert plans["big"] == (Stage.DENOISE, group)
    taken = set(group)
    for s in smalls:  # the others run on what is left, on their own ranks
        rank = int(s.request_id[1])
        assert plans.get(s.request_id) == (None if rank in taken else (Stage.DENOISE, (rank,)))


def test_edf_gives_spare_workers_to_the_earliest_deadline():
    requests = [make_request(f"l{i}", steps=50, shape=L, deadline_s=d, location=(i,))
                for i, d in zip(range(3), (300.0, 400.0, 200.0))]
    plans = plans_by_request(EDFPolicy(h20()).plan(view(requests, [0, 1, 2, 3])))
    assert plans == {"l0": (Stage.DENOISE, (0,)), "l1": (Stage.DENOISE, (1,)), "l2": (Stage.DENOISE, (2, 3))}


def test_a_small_image_is_never_widened_and_a_late_request_yields_to_an_on_time_one():
    alone = make_request("s", steps=50, deadline_s=100.0, location=(0,))
    assert plans_by_request(EDFPolicy(h20()).plan(view([alone], [0, 1, 2, 3]))) == {"s": (Stage.DENOISE, (0,))}
    doomed = make_request("doomed", steps=50, deadline_s=1.0, location=(0,))
    fine = make_request("fine", arrival=5.0, steps=50, deadline_s=60.0, location=(0,))
    plans = ElasticPolicy(h20()).plan(view([doomed, fine], [0], num_workers=1, degrees=(1,)))
    assert [p.request_ids for p in plans] == [["fine"]]


def test_stages_decode_on_a_holder_encode_new_requests_and_wait_for_busy_holders():
    new = [make_request(f"new{i}", arrival=i) for i in range(3)]
    done = make_request("done", steps=4, location=(1,), step=4)
    stuck = make_request("stuck", steps=4, location=(3,), step=1)  # rank 3 is busy
    plans = ElasticPolicy(h20()).plan(view([*new, done, stuck], [0, 1, 2]))
    assert (Stage.DECODE, ["done"], (1,)) in [(p.stage, p.request_ids, p.group) for p in plans]
    encodes = [p for p in plans if p.stage == Stage.ENCODE]
    assert sorted(rid for p in encodes for rid in p.request_ids) == ["new0", "new1", "new2"]
    assert all(len(p.group) == 1 and p.group[0] in (0, 2) for p in encodes)
    assert all("stuck" not in p.request_ids for p in plans)


def test_new_requests_are_encoded_where_the_least_work_is_held():
    """Where a request is encoded is where it will run: rank 0 already holds a long request."""
    held = make_request("held", steps=50, shape=L, deadline_s=400.0, location=(0,))
    new = [make_request(f"new{i}", arrival=1.0 + i, steps=50, deadline_s=12.0) for i in range(7)]
    plans = EDFPolicy(h20()).plan(view([held, *new], [0, 1, 2, 3]))
    per_rank = {p.group[0]: len(p.request_ids) for p in plans if p.stage == Stage.ENCODE}
    assert sum(per_rank.values()) == 7
    assert 0 not in per_rank and sorted(per_rank.values()) == [2, 2, 3]
    assert (Stage.DENOISE, ["held"], (0,)) in [(p.stage, p.request_ids, p.group) for p in plans]


def test_elastic_goes_wide_when_few_wait_and_narrow_when_many_do():
    alone = make_request("alone", steps=50, shape=L, location=(0,))
    assert plans_by_request(ElasticPolicy(h20()).plan(view([alone], [0, 1, 2, 3]))) == {
        "alone": (Stage.DENOISE, (0, 1, 2, 3))}
    crowd = [make_request(f"c{i}", arrival=i, steps=50, shape=L, location=(i,)) for i in range(4)]
    plans = ElasticPolicy(h20()).plan(view(crowd, [0, 1, 2, 3]))
    assert plans_by_request(plans) == {f"c{i}": (Stage.DENOISE, (i,)) for i in range(4)}


def test_elastic_spares_go_where_they_save_most_edf_spares_to_the_earliest_deadline():
    """A 1536 step saves 677 ms at degree 2, a 1024 step 216 ms; the 1024 one is due first."""
    big = make_request("big", steps=50, shape=L, deadline_s=400.0, location=(0,))
    mid = make_request("mid", steps=50, shape=M, deadline_s=300.0, location=(1,))
    free = [0, 1, 3]
    elastic = plans_by_request(ElasticPolicy(h20()).plan(view([big, mid], free)))
    edf = plans_by_request(EDFPolicy(h20()).plan(view([big, mid], free)))
    assert elastic == {"big": (Stage.DENOISE, (0, 3)), "mid": (Stage.DENOISE, (1,))}
    assert edf == {"big": (Stage.DENOISE, (0,)), "mid": (Stage.DENOISE, (1, 3))}


def test_elastic_batches_only_where_the_cost_model_says_it_pays():
    requests = [make_request(f"r{i}", arrival=i, steps=20, location=(i % 2,)) for i in range(6)]
    batched = ElasticPolicy(batching_model()).plan(view(requests, [0, 1], num_workers=2, degrees=(1, 2)))
    assert sorted(sorted(p.request_ids) for p in batched) == [["r0", "r2", "r4"], ["r1", "r3", "r5"]]
    assert all(p.group == (int(p.request_ids[0][1]) % 2,) for p in batched)  # each batch on its holder
    alone = ElasticPolicy(h20()).plan(view(requests, [0, 1], num_workers=2, degrees=(1, 2)))
    assert sorted(len(p.request_ids) for p in alone) == [1, 1]  # H20 degree 1: no gain from batching


def test_elastic_does_not_batch_into_a_task_whose_member_would_then_miss():
    cm = batching_model()
    # 20 steps alone: 20 x 0.2024 s = 4.05 s; in a batch of two, 20 x 0.3048 s = 6.1 s.
    tight = make_request("tight", steps=20, deadline_s=5.0, location=(0,))
    other = make_request("other", arrival=1.0, steps=20, location=(0,))
    plans = ElasticPolicy(cm).plan(view([tight, other], [0], num_workers=1, degrees=(1,)))
    assert [p.request_ids for p in plans] == [["tight"]]
    relaxed = make_request("tight", steps=20, deadline_s=50.0, location=(0,))
    plans = ElasticPolicy(cm).plan(view([relaxed, other], [0], num_workers=1, degrees=(1,)))
    assert [sorted(p.request_ids) for p in plans] == [["other", "tight"]]


def test_elastic_is_sticky_and_ignores_tiny_gains():
    back = make_request("back", steps=50, shape=L, location=(0, 1, 2, 3), step=10)
    plans = ElasticPolicy(h20()).plan(view([back], [0, 1, 2, 3]))
    assert [p.group for p in plans] == [(0, 1, 2, 3)]
    flat = CostModel(Profile("flat", 16, 20, (Point("denoise", 512, 512, 1, 1, 100.0),
                                              Point("denoise", 512, 512, 1, 2, 98.0))))
    r = make_request("r", steps=20, location=(0,))
    assert [p.group for p in ElasticPolicy(flat).plan(view([r], [0, 1], num_workers=2, degrees=(1, 2)))] == [(0,)]
    assert [p.group for p in EDFPolicy(flat).plan(view([r], [0, 1], num_workers=2, degrees=(1, 2)))] == [(0, 1)]


def test_a_slow_rank_is_left_out_and_a_group_that_needs_it_is_not_worth_it():
    alone = make_request("alone", steps=50, shape=L, location=(0,))
    plans = ElasticPolicy(h20()).plan(view([alone], [0, 1, 2, 3], rank_speed={1: 0.5}))
    assert [p.group for p in plans] == [(0, 2)]


def test_cost_aware_policies_need_a_cost_model():
    with pytest.raises(ValueError, match="needs a cost model"):
        Scheduler(make_policy("elastic"), num_workers=2, degrees=(1, 2))
    assert make_policy("edf", cost_model=h20()).cost_model is not None


@pytest.mark.parametrize("name", ["edf", "elastic"])
def test_every_request_finishes_through_the_real_scheduler(name):
    """Staggered S/M/L arrivals, some with deadlines, tasks completed at the cost model's times."""
    cm = h20()
    sched = Scheduler(make_policy(name, cost_model=cm), num_workers=4, degrees=(1, 2, 4))
    pending = [make_request(f"r{i}", arrival=i * 0.5, steps=6, shape=(S, M, L)[i % 3],
                            deadline_s=None if i % 4 == 0 else 5.0 + i) for i in range(12)]
    running, now, finished, degrees = [], 0.0, set(), set()
    while pending or running or sched.num_unfinished:
        while pending and pending[0].arrival_time <= now:
            sched.add_request(pending.pop(0))
        for task in sched.schedule(now).tasks:
            r = sched.requests[task.request_ids[0]]
            tokens = r.tokens
            running.append((now + cm.stage_s(task.stage, tokens, len(task.request_ids), len(task.group)), task))
            if task.stage == Stage.DENOISE:
                degrees.add(len(task.group))
        if not running:
            now = pending[0].arrival_time
            continue
        running.sort(key=lambda x: x[0])
        now, task = running.pop(0)
        finished |= {u.request.request_id for u in complete(sched, task, now) if u.kind == UpdateKind.FINISHED}
    assert finished == {f"r{i}" for i in range(12)}
    assert len(degrees) > 1  # it did change degrees on the way


def test_an_idle_worker_takes_the_next_request_queued_behind_a_busy_holder():
    """Rank 0 holds three requests, rank 1 none: rank 0 sends one over instead of computing
    this round (a few ms), then computes its own; the scheduler accepts the move."""
    cm = h20()
    sched = Scheduler(make_policy("elastic", cost_model=cm), num_workers=2, degrees=(1, 2))
    for i in range(3):
        sched.add_request(make_request(f"q{i}", arrival=i, steps=50, shape=L))
    encode = sched.schedule(0.0).tasks
    assert [t.stage for t in encode] == [Stage.ENCODE] * len(encode)
    for task in encode:
        complete(sched, task, 0.0)
    for r in sched.requests.values():  # as if all three had been placed on rank 0
        r.location = (0,)
    [moved] = sched.schedule(0.0).tasks
    assert moved.group == (1,) and moved.request_ids == ["q1"]  # the next in line behind q0
    assert [(m.src, m.dsts) for m in moved.migrations] == [(0, (1,))] and moved.members == (1, 0)
    sched.on_result(TaskResult(moved.task_id, 0, []), 0.001)  # the sender is done first
    [own] = sched.schedule(0.001).tasks
    assert own.group == (0,) and own.request_ids == ["q0"] and not own.migrations
