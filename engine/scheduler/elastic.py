"""``elastic``: the degree of every request chosen per step from the queue and the cost model.

It plans like ``edf`` (same urgency order, same smallest degree that meets a deadline),
then uses what the round leaves in two ways that make it elastic:

- Many wait (more runnable requests than free workers): narrow and batched. Requests
  that got no worker join a same-shape denoise task already planned when the cost model
  says that saves at least ``min_batch_gain`` (20 %) of running them alone (the added
  step time, in worker-seconds, against their own most efficient step) and no on-time
  member of that task would then miss its deadline. The bar is high on purpose: a
  batch makes every member's step longer, and the worker answers new urgent requests
  only between steps; a CPU step of 512x512 images saves 5 % per added image and
  nearly doubles, which costs more deadlines than the capacity it buys.
- Few wait (workers left over): wide. Spare workers go where they save the most step
  time per added worker (migration included), as long as a step gets at least
  ``min_widen_gain`` faster, so a request alone on an idle machine runs at the degree
  that is fastest for its size, and a small image, which a wider group only slows, stays
  narrow.

Placement is sticky: a request goes back to ranks that hold its state when they are free
(holders first in every group), so it migrates only when its degree changes or its
holders are busy with more urgent work.
"""

from __future__ import annotations

from engine.messages import Stage
from engine.model_info import BatchKey
from engine.request import Request
from engine.scheduler.cost_model import CostModel
from engine.scheduler.edf import Draft, EDFPolicy, Round, holds


class ElasticPolicy(EDFPolicy):
    name = "elastic"

    def __init__(self, cost_model: CostModel | None = None, margin: float = 0.1, slo_factor: float = 4.0,
                 min_batch_gain: float = 0.2, min_widen_gain: float = 0.05) -> None:
        super().__init__(cost_model, margin=margin, slo_factor=slo_factor)
        self.min_batch_gain = min_batch_gain
        self.min_widen_gain = min_widen_gain

    def fill(self, rnd: Round) -> None:
        by_shape: dict[BatchKey, list[Draft]] = {}
        for draft in rnd.drafts:
            if draft.stage == Stage.DENOISE:
                by_shape.setdefault(draft.requests[0].key, []).append(draft)
        for q in rnd.order:
            if (q.key not in by_shape or q.request_id in rnd.taken or q.stage != Stage.DENOISE):
                continue
            best: tuple[float, Draft] | None = None
            for draft in by_shape[q.key]:
                if not holds(draft.group, [q]):
                    continue
                cost = self.batch_cost(rnd, draft, q)
                if cost is not None and (best is None or cost < best[0]):
                    best = (cost, draft)
            if best is not None:
                best[1].requests.append(q)
                rnd.taken.add(q.request_id)

    def batch_cost(self, rnd: Round, draft: Draft, q: Request) -> float | None:
        """Worker-seconds per step that ``q`` adds to ``draft``; None unless that is under
        ``1 - min_batch_gain`` of its own most efficient step and no on-time member of the
        batch would then miss its deadline."""
        book = rnd.book
        if draft.requests[0].key != q.key or draft.senders:
            return None
        if draft.images + q.n > rnd.view.batch_limit(Stage.DENOISE, q.key, draft.group):
            return None
        grown = Draft(draft.stage, [*draft.requests, q], draft.group)
        width = len(draft.group)
        cost = (self.task_s(rnd, grown, draft.group) - self.task_s(rnd, draft, draft.group)) * width
        if cost >= (1 - self.min_batch_gain) * book.cost(q).efficient_step_s:
            return None
        if any(book.has_deadline(m) and m.request_id not in book.late and book.slack(m, width, grown.images) < 0
               for m in draft.requests):
            return None
        return cost

    def spare(self, rnd: Round) -> None:
        denoise = [d for d in rnd.drafts if d.stage == Stage.DENOISE]
        while rnd.free:
            best: tuple[float, float, Draft, tuple[int, ...]] | None = None
            for draft in denoise:
                width = len(draft.group)
                targets = [d for d in rnd.degrees if width < d <= width + len(rnd.free)]
                found = self.widen(rnd, draft, targets) if targets else None
                if found is None:
                    continue
                group, gain = found
                if gain < self.min_widen_gain * self.task_s(rnd, draft, draft.group):
                    continue
                rate = gain / (len(group) - width)
                deadline = rnd.book.deadline[draft.requests[0].request_id]
                if best is None or (rate, -deadline) > (best[0], best[1]):
                    best = (rate, -deadline, draft, group)
            if best is None:
                return
            self.regroup(rnd, best[2], best[3])
