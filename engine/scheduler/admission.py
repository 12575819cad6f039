"""Memory admission: the scheduler's last check of every plan, whatever policy made it.

Policies already size their batches with ``SchedulerView.batch_limit`` and place new
requests with ``accepts_new``; this module enforces the same rules on any plan (a user's
policy included), so no batch is started whose predicted memory exceeds a member's
headroom:

- A batch keeps its requests, in the plan's order, as long as their images fit the limit.
  The first request always stays: a lone request runs even if its prediction does not
  fit (the prediction is conservative, and a task that runs out of memory fails only its
  own requests while the worker stays up); holding it would wait on memory that a
  foreign job may never free.
- An ENCODE on a nearly full rank creates no new state there: it is dropped while any of
  our requests holds state or runs (finishing them frees memory, and the requests are
  planned again), else it runs with its first request only, so waiting requests cannot
  hang on a device that only a foreign job fills.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from engine.messages import Stage
from engine.request import Request
from engine.scheduler.policy import Plan, SchedulerView


def admit(plan: Plan, view: SchedulerView, requests: Mapping[str, Request]) -> Plan | None:
    """``plan`` cut to what memory allows, or None to hold it back this round."""
    batch = [requests[rid] for rid in plan.request_ids]
    if plan.stage == Stage.ENCODE and any(rank in view.nearly_full for rank in plan.group):
        if view.memory_will_free:
            return None
        return replace(plan, request_ids=plan.request_ids[:1])
    limit = min(view.batch_limit(plan.stage, r.key, plan.group) for r in batch)
    kept, images = [], 0
    for r in batch:
        if kept and images + r.n > limit:
            continue
        kept.append(r.request_id)
        images += r.n
    return plan if len(kept) == len(batch) else replace(plan, request_ids=kept)
