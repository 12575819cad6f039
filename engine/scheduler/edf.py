"""``edf``: earliest deadline first, each request at the smallest degree that meets its deadline.

Per planning round, free workers go to idle requests in urgency order (see urgency.py:
priority, then requests that can still meet their deadline by deadline, then late ones
by work left). Each request takes its next stage:

- ENCODE on one free rank, with the other new requests that fit in the batch;
- DECODE on a free rank that holds its state, with the same-shape requests held there;
- DENOISE on a group of the smallest degree whose predicted finish (the cost model,
  alone from now on, with ``margin`` of its remaining time to spare) meets the
  deadline; if none does, the fastest degree the free workers allow. Late requests and
  requests without a deadline run at the most efficient degree.

Workers left over once every idle request has its task ("spare") widen the denoise
groups with the earliest deadlines, one degree at a time, as long as the cost model says
the wider group is faster (migration included). A round never leaves a worker idle that
an idle request could use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.messages import Stage
from engine.request import Request
from engine.scheduler.cost_model import CostModel
from engine.scheduler.placement import pick_group
from engine.scheduler.policy import Plan, Policy, SchedulerView
from engine.scheduler.urgency import DeadlineBook


@dataclass
class Draft:
    """A plan being built: a stage for a batch of requests on a group."""

    stage: Stage
    requests: list[Request]
    group: tuple[int, ...]
    # Free holders outside the group that send a request's state to it (then drop it).
    senders: frozenset[int] = field(default_factory=frozenset)

    @property
    def images(self) -> int:
        return sum(r.n for r in self.requests)

    def reaches(self, group: tuple[int, ...]) -> bool:
        """Whether every request's state is in ``group`` or with one of the senders."""
        return holds(tuple(group) + tuple(self.senders), self.requests)

    def plan(self, steps_per_task: int) -> Plan:
        steps = steps_per_task if self.stage == Stage.DENOISE else 1
        return Plan(self.stage, [r.request_id for r in self.requests], self.group, steps)


@dataclass
class Round:
    """What one planning round knows and has decided so far."""

    view: SchedulerView
    book: DeadlineBook
    degrees: tuple[int, ...]
    free: set[int]
    order: list[Request]
    drafts: list[Draft]
    taken: set[str]
    slow: set[int]
    load: dict[int, float] | None = None  # worker-seconds of state held per rank, once needed

    def take(self, draft: Draft) -> None:
        self.free.difference_update(draft.group)
        self.free.difference_update(draft.senders)
        self.taken.update(r.request_id for r in draft.requests)
        self.drafts.append(draft)


class EDFPolicy(Policy):
    name = "edf"

    def __init__(self, cost_model: CostModel | None = None, margin: float = 0.1, slo_factor: float = 4.0) -> None:
        self.cost_model = cost_model
        self.margin = margin
        self.slo_factor = slo_factor

    def validate(self, num_workers: int, degrees: tuple[int, ...]) -> None:
        if self.cost_model is None:
            raise ValueError(f"policy {self.name} needs a cost model: pass a profile (--profile NAME|PATH; "
                             "`gfdit profile MODEL -o FILE` measures one)")
        if 1 not in self.cost_model.degrees:
            raise ValueError(f"policy {self.name}: the profile has no degree-1 denoise figures")

    # ----- the round ---------------------------------------------------------------
    def plan(self, view: SchedulerView) -> list[Plan]:
        assert self.cost_model is not None, "validate() first"
        degrees = tuple(d for d in view.degrees if d in self.cost_model.degrees) or (1,)
        book = DeadlineBook(self.cost_model, view, degrees, slo_factor=self.slo_factor)
        rnd = Round(view, book, degrees, set(view.free_workers), book.ordered(view.requests), [], set(),
                    view.avoided())
        for r in rnd.order:
            if not rnd.free:
                break
            if r.request_id not in rnd.taken:
                self._start(rnd, r)
        self.steal(rnd)
        self.fill(rnd)
        self.spare(rnd)
        return [d.plan(view.steps_per_task) for d in rnd.drafts]

    def _start(self, rnd: Round, r: Request) -> None:
        view = rnd.view
        if r.stage == Stage.ENCODE:
            if not any(self._may_encode(rnd, r, rank) for rank in rnd.free):
                return  # no free device has room for its state, or time for it, yet
            rank, batch = self._encode_share(rnd, r)
            rnd.take(Draft(Stage.ENCODE, batch, (rank,)))
        elif r.stage == Stage.DECODE:
            holders = [rank for rank in r.location if rank in rnd.free]
            if holders:
                same = r.location
                limit = view.batch_limit(Stage.DECODE, r.key, (holders[0],))
                batch = self._followers(rnd, r, lambda q: q.stage == Stage.DECODE and q.location == same and q.key == r.key,
                                        limit)
                rnd.take(Draft(Stage.DECODE, batch, (holders[0],)))
        elif any(rank in rnd.free for rank in r.location):  # else its holders are busy: it waits
            allowed = [d for d in rnd.degrees if d <= len(rnd.free)]
            degree = self.degree(rnd, r, allowed)
            group = pick_group(rnd.free, degree, r.location, view.num_workers, rnd.slow)
            if group is not None and view.speed(group) < 1.0:
                group = self._off_slow(rnd, r, degree, group)
            if group is not None and holds(group, [r]):
                rnd.take(Draft(Stage.DENOISE, [r], group))
            elif group is not None:
                senders = frozenset(rank for rank in r.location if rank in rnd.free)
                rnd.take(Draft(Stage.DENOISE, [r], group, senders))

    def _off_slow(self, rnd: Round, r: Request, degree: int, group: tuple[int, ...]) -> tuple[int, ...]:
        """A group of fast ranks for ``r`` if ``group`` is slowed (a device shared with a
        foreign job) and would make it miss its deadline; its holder then sends the state.

        Only state on one rank moves this way (then that rank is the sender); a request
        that would meet its deadline anyway stays, leaving the fast ranks to others."""
        book, view = rnd.book, rnd.view
        speed = view.speed(group)
        if (len(r.location or ()) != 1 or not book.has_deadline(r) or r.request_id in book.late
                or book.slack(r, degree, speed=speed) >= 0):
            return group
        moved = pick_group(rnd.free, degree, r.location, view.num_workers, rnd.slow, may_move=True)
        return moved if moved is not None and view.speed(moved) > speed else group

    @staticmethod
    def _may_encode(rnd: Round, q: Request, rank: int) -> bool:
        """Whether ``rank`` may take ``q``'s new state: it has the memory, and, if slower
        than another device, the request would still meet its deadline there. Where a
        request is encoded is where it runs, so a tight request placed on a shared device
        would miss; it waits for a faster one instead (or until it is late anyway)."""
        view = rnd.view
        if not view.accepts_new(rank, q):
            return False
        speed = view.speed((rank,))
        fastest = max(view.speed((k,)) for k in range(view.num_workers))
        book = rnd.book
        # With no faster device anywhere, waiting would not help.
        return (speed >= fastest or not book.has_deadline(q) or q.request_id in book.late
                or book.slack(q, 1, speed=speed) >= 0)

    def _encode_share(self, rnd: Round, leader: Request) -> tuple[int, list[Request]]:
        """Spread the new requests over the free ranks by the work each rank already holds
        (water-filling, at most a batch per rank) and return the leader's rank and share.

        Where a request is encoded is where its state lives, and a request moves only
        from a free holder, so placing new work evenly now is what keeps every worker busy
        later."""
        book = rnd.book
        if rnd.load is None:
            rnd.load = {}
            for r in [*rnd.view.requests, *rnd.view.running]:
                for rank in r.location or ():
                    rnd.load[rank] = rnd.load.get(rank, 0.0) + book.work_s(r) / len(r.location)
        view = rnd.view
        free = sorted(rnd.free)
        load = {rank: rnd.load.get(rank, 0.0) for rank in free}
        # Work on a slowed rank takes longer: compare finish times, not worker-seconds.
        speed = {rank: view.speed((rank,)) for rank in free}
        images = dict.fromkeys(free, 0)
        shares: dict[int, list[Request]] = {rank: [] for rank in free}
        for q in rnd.order:
            if q.stage != Stage.ENCODE or q.request_id in rnd.taken:
                continue
            accepting = [k for k in free if self._may_encode(rnd, q, k)]
            open_ranks = [k for k in accepting if not shares[k]
                          or images[k] + q.n <= view.batch_limit(Stage.ENCODE, q.key, (k,))]
            if not open_ranks:
                if accepting:
                    break
                continue
            rank = min(open_ranks, key=lambda k: (load[k] / speed[k], k in rnd.slow, k))
            shares[rank].append(q)
            load[rank] += book.work_s(q)
            images[rank] += q.n
        rank = next(k for k, share in shares.items() if leader in share)
        for q in shares[rank]:
            rnd.load[rank] = rnd.load.get(rank, 0.0) + book.work_s(q)
        return rank, shares[rank]

    def _followers(self, rnd: Round, leader: Request, fits: Any, limit: int) -> list[Request]:
        """The leader and, in urgency order, idle requests that may share its task."""
        batch, images = [leader], leader.n
        for q in rnd.order:
            if q is leader or q.request_id in rnd.taken or not fits(q):
                continue
            if images + q.n > limit:
                continue
            batch.append(q)
            images += q.n
        return batch

    # ----- decisions a subclass may change -----------------------------------------
    def degree(self, rnd: Round, r: Request, allowed: list[int]) -> int:
        """The smallest degree that meets the deadline with margin; else the fastest."""
        book = rnd.book
        if r.request_id in book.late or not book.has_deadline(r):
            return self.efficient_degree(rnd, r, allowed)
        for d in allowed:
            if book.slack(r, d) >= self.margin * book.remaining_s(r, d):
                return d
        return min(allowed, key=lambda d: (book.step_s(r, d), d))

    def efficient_degree(self, rnd: Round, r: Request, allowed: list[int]) -> int:
        return min(allowed, key=lambda d: (d * rnd.book.step_s(r, d), d))

    def fill(self, rnd: Round) -> None:
        """Use what the round left: edf does not batch denoise steps."""

    def steal(self, rnd: Round) -> None:
        """Give a worker left idle requests queued behind another worker's task.

        A request moves only from a free holder, and a holder computing this round is not
        free: so the holder with the most queued work sends its next queued requests (a
        batch where batching pays, up to half its queue) to the idle worker this round,
        and computes its own next round, once the sends (milliseconds) are done. Without
        this, work placed on a worker stays there while another idles."""
        book = rnd.book
        if not rnd.view.state_transfer:
            return
        for idle in sorted(rnd.free):
            queued: dict[int, list[Request]] = {}
            for r in rnd.view.requests:
                if r.stage == Stage.DENOISE and len(r.location) == 1 and r.request_id not in rnd.taken:
                    queued.setdefault(r.location[0], []).append(r)
            victims = [d for d in rnd.drafts if d.stage == Stage.DENOISE and len(d.group) == 1
                       and queued.get(d.group[0])]
            if not victims:
                return
            draft = max(victims, key=lambda d: (sum(book.work_s(r) for r in queued[d.group[0]]), -d.group[0]))
            queue = book.ordered(queued[draft.group[0]])  # most urgent first
            first = queue[0]
            if self.cost_model.migration_s(book.tokens(first), first.n) >= book.step_s(first, 1):  # type: ignore[union-attr]
                continue
            moved = Draft(Stage.DENOISE, [first], (idle,))
            half = sum(book.work_s(r) for r in [*queue, *draft.requests]) / 2
            for q in queue[1:]:
                if sum(book.work_s(r) for r in moved.requests) >= half:
                    break
                if q.key == first.key and self.batch_cost(rnd, moved, q) is not None:
                    moved.requests.append(q)
            rnd.drafts.remove(draft)
            rnd.taken.difference_update(r.request_id for r in draft.requests)
            rnd.take(moved)

    def batch_cost(self, rnd: Round, draft: Draft, q: Request) -> float | None:
        """The worker-seconds per step that adding ``q`` to ``draft`` costs, or None if it
        should not join: edf never batches denoise steps."""
        return None

    def spare(self, rnd: Round) -> None:
        """Widen the earliest-deadline denoise groups while workers are left and it helps."""
        denoise = sorted((d for d in rnd.drafts if d.stage == Stage.DENOISE),
                         key=lambda d: rnd.book.deadline[d.requests[0].request_id])
        for draft in denoise:
            while rnd.free:
                wider = next_degree(rnd.degrees, len(draft.group))
                found = self.widen(rnd, draft, [wider]) if wider is not None else None
                if found is None:
                    break
                self.regroup(rnd, draft, found[0])

    def task_s(self, rnd: Round, draft: Draft, group: tuple[int, ...], images: int | None = None) -> float:
        """Predicted seconds of one step of ``draft`` on ``group``, migrations included."""
        book = rnd.book
        lead = draft.requests[0]
        images = draft.images if images is None else images
        seconds = book.step_s(lead, len(group), images, rnd.view.speed(group))
        for r in draft.requests:
            if not set(group) <= set(r.location or ()):
                seconds += self.cost_model.migration_s(book.tokens(r), r.n)  # type: ignore[union-attr]
        return seconds

    def widen(self, rnd: Round, draft: Draft, targets: list[int]) -> tuple[tuple[int, ...], float] | None:
        """The wider group for ``draft`` (degrees ``targets``) that saves the most seconds per
        added worker, and the seconds it saves; None if no wider group is faster."""
        pool = rnd.free | set(draft.group)
        prefer = tuple(draft.group) + tuple(draft.requests[0].location or ())
        current = self.task_s(rnd, draft, draft.group)
        best: tuple[tuple[int, ...], float] | None = None
        shape = draft.requests[0].key
        for d in targets:
            group = pick_group(pool, d, prefer, rnd.view.num_workers, rnd.slow) if d <= len(pool) else None
            if group is None or not draft.reaches(group):
                continue
            if len(draft.requests) > 1 and draft.images > rnd.view.batch_limit(Stage.DENOISE, shape, group):
                continue
            gain = current - self.task_s(rnd, draft, group)
            if gain <= 0:
                continue
            if best is None or gain / (d - len(draft.group)) > best[1] / (len(best[0]) - len(draft.group)):
                best = (group, gain)
        return best

    @staticmethod
    def regroup(rnd: Round, draft: Draft, group: tuple[int, ...]) -> None:
        rnd.free.update(draft.group)
        rnd.free.difference_update(group)
        draft.group = group


def holds(group: tuple[int, ...], requests: list[Request]) -> bool:
    """Whether every request has a copy of its state inside ``group``: then its migration,
    if any, comes from a group member, and no rank outside the group is drawn in."""
    return all(r.location is not None and not set(group).isdisjoint(r.location) for r in requests)


def next_degree(degrees: tuple[int, ...], current: int) -> int | None:
    return next((d for d in degrees if d > current), None)
