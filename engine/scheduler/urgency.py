"""Deadlines, predicted finishes and the urgency order that deadline-aware policies share.

Every unfinished request gets a deadline: its own (``deadline_s`` after arrival), or, when
it has none, a virtual one at ``slo_factor`` times its predicted time alone on one worker
after arrival, so that requests without deadlines age into the order instead of starving.

Under overload plain EDF fails badly: it spends the workers on requests that will miss
anyway, and every request behind them misses too. So the book runs a fluid check in EDF
order: the work of the requests ahead (at their most efficient degree) spread over all
workers, plus the request's own, must fit before its deadline. When it does not, the
largest request so far at that priority is marked *late* (Moore-Hodgson: on one machine
this minimises the number of late jobs; here it sacrifices one big request rather than
several small ones), as is a request that cannot make it even alone at its fastest
degree. Late requests go behind the ones that can still make it, shortest remaining
work first (that keeps mean latency low); they are never dropped. Requests without a
deadline are never marked late, and a lower priority never pushes a higher one out.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from engine.messages import Stage
from engine.request import Request
from engine.scheduler.cost_model import CostModel
from engine.scheduler.policy import SchedulerView


@dataclass(frozen=True)
class ShapeCost:
    """Cost-model figures for one (tokens, images) shape, computed once per round."""

    encode_s: float
    decode_s: float
    step_s: dict[int, float]  # per degree
    efficient_step_s: float  # min over degrees of degree x step: worker-seconds per step
    fastest_step_s: float


class DeadlineBook:
    """Predictions for one planning round; built from a SchedulerView and a cost model."""

    def __init__(self, cost_model: CostModel, view: SchedulerView, degrees: Sequence[int], *,
                 slo_factor: float = 4.0) -> None:
        self.cm = cost_model
        self.now = view.now
        self.degrees = tuple(degrees) or (1,)
        self.num_workers = view.num_workers
        self.slo_factor = slo_factor
        self.deadline: dict[str, float] = {}
        self.late: set[str] = set()
        self._shapes: dict[tuple[int, int, bool, float], ShapeCost] = {}
        self._order_key: dict[str, tuple] = {}
        self._classify([*view.requests, *view.running])

    # ----- predictions -------------------------------------------------------------
    def tokens(self, r: Request) -> int:
        return r.tokens

    def cost(self, r: Request, images: int | None = None) -> ShapeCost:
        # A request's measured step-cache hit rate, in steps of 5 %, keeps the memo small.
        key = (r.tokens, r.n if images is None else images, r.key.adapter is not None,
               round(r.cache_hit_rate * 20) / 20)
        found = self._shapes.get(key)
        if found is None:
            t, n, lora, cached = key
            steps = {d: self.cm.step_s(t, n, d, lora, cached) for d in self.degrees}
            found = self._shapes[key] = ShapeCost(
                self.cm.stage_s(Stage.ENCODE, t, n), self.cm.stage_s(Stage.DECODE, t, n), steps,
                min(d * s for d, s in steps.items()), min(steps.values()))
        return found

    def step_s(self, r: Request, degree: int, images: int | None = None, speed: float = 1.0) -> float:
        cost = self.cost(r, images)
        seconds = (cost.step_s[degree] if degree in cost.step_s
                   else self.cm.step_s(self.tokens(r), r.n, degree, r.key.adapter is not None, r.cache_hit_rate))
        return seconds / speed

    def remaining_s(self, r: Request, degree: int = 1, images: int | None = None, speed: float = 1.0) -> float:
        """Time left for ``r`` alone at ``degree`` (its batch holding ``images`` images)."""
        cost = self.cost(r, images)
        return (self._stages_s(r, cost) + self._steps_left(r) * cost.step_s[degree]) / speed

    def work_s(self, r: Request) -> float:
        """Worker-seconds left at the most efficient degree (the capacity ``r`` consumes)."""
        cost = self.cost(r)
        return self._stages_s(r, cost) + self._steps_left(r) * cost.efficient_step_s

    def fastest_s(self, r: Request) -> float:
        cost = self.cost(r)
        return self._stages_s(r, cost) + self._steps_left(r) * cost.fastest_step_s

    @staticmethod
    def _stages_s(r: Request, cost: ShapeCost) -> float:
        """Encode (if still to do) and decode: one rank each, whatever the degree."""
        return cost.decode_s + (cost.encode_s if r.stage == Stage.ENCODE else 0.0)

    @staticmethod
    def _steps_left(r: Request) -> int:
        return max(0, r.num_steps - r.step)

    def slack(self, r: Request, degree: int, images: int | None = None, speed: float = 1.0) -> float:
        """Seconds to spare if ``r`` ran from now on at ``degree`` (negative: it would miss)."""
        return self.deadline[r.request_id] - self.now - self.remaining_s(r, degree, images, speed)

    def has_deadline(self, r: Request) -> bool:
        return r.deadline is not None

    # ----- order -------------------------------------------------------------------
    def ordered(self, requests: Iterable[Request]) -> list[Request]:
        """Most urgent first: priority, then on-time by deadline, then late by work left."""
        return sorted(requests, key=lambda r: self._order_key[r.request_id])

    def _classify(self, requests: list[Request]) -> None:
        for r in requests:
            if r.deadline is not None:
                self.deadline[r.request_id] = r.deadline
            else:
                cost = self.cost(r)
                alone = cost.encode_s + cost.decode_s + r.num_steps * cost.step_s[self.degrees[0]]
                self.deadline[r.request_id] = r.arrival_time + self.slo_factor * alone
        edf = sorted(requests, key=lambda r: (-r.params.priority, self.deadline[r.request_id], r.arrival_time))
        backlog = 0.0
        work: dict[str, float] = {}
        candidates: list[tuple[float, int, Request]] = []  # max-heap by work: who may be made late
        level = None
        for k, r in enumerate(edf):
            rid, cost = r.request_id, self.cost(r)
            stages, left = self._stages_s(r, cost), self._steps_left(r)
            work[rid] = stages + left * cost.efficient_step_s
            if r.params.priority != level:  # a lower priority never pushes a higher one out
                level, candidates = r.params.priority, []
            if r.deadline is not None and self.now + stages + left * cost.fastest_step_s > r.deadline:
                self.late.add(rid)  # too late even alone at its fastest degree
                continue
            backlog += work[rid]
            if r.deadline is not None:
                heapq.heappush(candidates, (-work[rid], -k, r))  # ties: the latest deadline goes
            if r.deadline is not None and self.now + backlog / self.num_workers > r.deadline and candidates:
                # Moore-Hodgson: drop the largest job so far, which makes the rest fit again.
                _, _, victim = heapq.heappop(candidates)
                backlog -= work[victim.request_id]
                self.late.add(victim.request_id)
        for r in requests:
            rid = r.request_id
            if rid in self.late:
                self._order_key[rid] = (-r.params.priority, 1, work[rid], r.arrival_time)
            else:
                self._order_key[rid] = (-r.params.priority, 0, self.deadline[rid], r.arrival_time)
