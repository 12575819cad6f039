"""Test-only policy and worker hook for sequence parallelism across worker processes."""

from __future__ import annotations

from engine.messages import Stage
from engine.scheduler.policy import Plan, Policy, SchedulerView

# Denoise step k of a request runs on CYCLE[k % 4]: degree 1, 2, 1, 2 ... and every change
# of group moves the state to a worker that does not hold it yet.
CYCLE: list[tuple[int, ...]] = [(0,), (0, 1), (1,), (1, 0)]


class DegreeCycle(Policy):
    """Encode on rank 0, then one step at a time on the groups of CYCLE, then decode on the
    group's leader; one task per request, oldest first, on free ranks only."""

    name = "degree-cycle"

    def validate(self, num_workers: int, degrees: tuple[int, ...]) -> None:
        if num_workers != 2 or 2 not in degrees:
            raise ValueError("degree-cycle runs on exactly 2 workers with degree 2")

    def plan(self, view: SchedulerView) -> list[Plan]:
        free = set(view.free_workers)
        plans = []
        for request in view.requests:
            if request.location is None:
                stage, group, steps = Stage.ENCODE, (0,), 1
            elif request.denoised:
                stage, group, steps = Stage.DECODE, request.location[:1], 1
            else:
                stage, group, steps = Stage.DENOISE, CYCLE[request.step % len(CYCLE)], 1
            if free.issuperset(group):
                free.difference_update(group)
                plans.append(Plan(stage, [request.request_id], group, steps))
        return plans


def forbid_new_group(worker) -> None:
    """Worker hook: any ``torch.distributed.new_group`` in a worker process raises (and so
    fails the task that called it). Communicators are made once, with the world."""
    import torch.distributed as dist

    def new_group(*args, **kwargs):
        raise AssertionError("torch.distributed.new_group was called in a worker process")

    dist.new_group = new_group
