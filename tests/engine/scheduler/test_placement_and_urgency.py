"""Group placement and the deadline book that edf and elastic share (no torch)."""

import pytest

from engine.scheduler.placement import pick_group
from engine.scheduler.urgency import DeadlineBook
from tests.scheduling_helpers import L, h20, make_request, view


def test_groups_take_holders_first_then_aligned_blocks():
    assert pick_group({0, 1, 2, 3}, 1, holders=(2,), num_workers=4) == (2,)
    # No holder: the rank on the partly busy block, so (2, 3) stays whole for a wide group.
    assert pick_group({0, 2, 3}, 1, num_workers=4) == (0,)
    assert pick_group({1, 2, 3}, 2, num_workers=4) == (2, 3)
    assert pick_group({1, 2, 3}, 2, holders=(1,), num_workers=4) == (1, 2)
    assert pick_group({0, 1, 2, 3}, 4, holders=(3,), num_workers=4) == (0, 1, 2, 3)
    assert pick_group({0, 1}, 4, num_workers=4) is None


def test_slow_ranks_are_taken_last():
    assert pick_group({0, 1, 2, 3}, 2, num_workers=4, slow={0}) == (2, 3)
    assert pick_group({0, 1, 2, 3}, 1, num_workers=4, slow={0}) == (1,)
    assert pick_group({0, 1, 2, 3}, 2, holders=(0,), num_workers=4, slow={1}) == (0, 2)


def test_deadlines_are_real_or_virtual():
    cm = h20()
    real = make_request("real", arrival=5.0, steps=50, deadline_s=20.0)
    virtual = make_request("virtual", arrival=5.0, steps=50)
    book = DeadlineBook(cm, view([real, virtual], [0]), (1, 2, 4), slo_factor=3.0)
    assert book.deadline["real"] == 25.0
    assert book.deadline["virtual"] == pytest.approx(5.0 + 3 * 50 * 0.155)
    assert book.remaining_s(real, 1) == pytest.approx(50 * 0.155)
    assert book.work_s(real) == pytest.approx(50 * 0.155)  # degree 1 is the most efficient for 512x512


def test_requests_the_workers_cannot_fit_before_their_deadline_are_late():
    """Eight L requests (77.85 s each alone on one GPU) due in 80 s on 4 GPUs: four fit."""
    cm = h20()
    requests = [make_request(f"r{i}", arrival=i * 1e-3, steps=50, shape=L, deadline_s=80.0) for i in range(8)]
    book = DeadlineBook(cm, view(requests, [0, 1, 2, 3]), (1, 2, 4))
    assert book.late == {"r4", "r5", "r6", "r7"}
    order = [r.request_id for r in book.ordered(requests)]
    assert order[:4] == ["r0", "r1", "r2", "r3"]


def test_urgency_order_priority_then_on_time_by_deadline_then_late_by_work_left():
    cm = h20()
    loose = make_request("loose", steps=50, deadline_s=500.0)
    tight = make_request("tight", arrival=1.0, steps=50, deadline_s=10.0)
    vip = make_request("vip", arrival=2.0, steps=50, deadline_s=900.0, priority=1)
    doomed_big = make_request("doomed_big", steps=50, shape=L, deadline_s=1.0)
    doomed_small = make_request("doomed_small", steps=50, deadline_s=1.0, location=(0,), step=40)
    requests = [loose, tight, vip, doomed_big, doomed_small]
    book = DeadlineBook(cm, view(requests, [0, 1, 2, 3]), (1, 2, 4))
    assert book.late == {"doomed_big", "doomed_small"}
    assert [r.request_id for r in book.ordered(requests)] == ["vip", "tight", "loose", "doomed_small", "doomed_big"]


def test_requests_without_deadline_are_never_late_and_running_ones_count():
    cm = h20()
    running = [make_request(f"run{i}", steps=50, shape=L, deadline_s=79.0, location=(i,)) for i in range(4)]
    waiting = make_request("waiting", arrival=1.0, steps=50, shape=L, deadline_s=80.0)
    relaxed = make_request("relaxed", arrival=1.0, steps=50, shape=L)
    book = DeadlineBook(cm, view([waiting, relaxed], [], running=running), (1, 2, 4))
    assert "waiting" in book.late  # the four running requests hold every GPU until after 80 s
    assert "relaxed" not in book.late
    assert not book.late & {r.request_id for r in running}


def test_under_overload_the_largest_request_is_made_late_not_the_small_ones():
    """One GPU: an L (77.85 s) due at 80 s, then four S (7.75 s each) due at 85 s. Plain
    EDF keeps the L and every S misses; dropping the L alone lets the four S make it."""
    cm = h20()
    big = make_request("big", steps=50, shape=L, deadline_s=80.0)
    smalls = [make_request(f"s{i}", arrival=1.0, steps=50, deadline_s=84.0) for i in range(4)]
    book = DeadlineBook(cm, view([big, *smalls], [0], num_workers=1, degrees=(1,)), (1,))
    assert book.late == {"big"}
    vip = make_request("vip", steps=50, shape=L, deadline_s=80.0, priority=1)
    book = DeadlineBook(cm, view([vip, *smalls], [0], num_workers=1, degrees=(1,)), (1,))
    assert book.late == {"s0", "s1", "s2", "s3"}  # a higher priority is never the one pushed out
