"""Built-in scheduling policies and the registry that ``--policy`` selects from."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from engine.messages import Stage
from engine.request import Request
from engine.scheduler.policy import Plan, Policy, SchedulerView, take_batch


class FCFSPolicy(Policy):
    """Continuous batching at degree 1, oldest request first (higher priority earlier).

    Each free worker, in turn, takes the first of:
    1. a VAE decode of its requests that finished denoising (ends them, frees memory);
    2. the text encoding of new requests, spread over the free workers so the least
       loaded gets them (new requests then join the running batches at once), but never
       twice in a row while the worker has requests to denoise, so a steady stream of
       arrivals cannot stall the running ones;
    3. one denoise step for the batch of its requests that share the shape of its most
       urgent one, each request at its own step.
    Requests of other shapes wait for their own turn: the most urgent request's shape
    always runs next, so no shape starves.

    With telemetry, batches are capped by memory (``SchedulerView.batch_limit``), new
    requests skip ranks that cannot take their state (``accepts_new``), and a rank's load
    counts as load / speed, so a device shared with a foreign job gets fewer of them.
    """

    name = "fcfs"

    def sort_key(self, request: Request) -> tuple[Any, ...]:
        return (-request.params.priority, request.arrival_time)

    def plan(self, view: SchedulerView) -> list[Plan]:
        plans: list[Plan] = []
        idle: list[int] = []
        for rank in sorted(view.free_workers, key=view.load):
            ready = sorted(view.on_rank(rank, denoised=True), key=self.sort_key)
            if ready:
                batch = take_batch(ready, ready[0].key, view.batch_limit(Stage.DECODE, ready[0].key, (rank,)))
                plans.append(Plan(Stage.DECODE, [r.request_id for r in batch], (rank,)))
            else:
                idle.append(rank)
        running = {rank: sorted(view.on_rank(rank, denoised=False), key=self.sort_key) for rank in idle}
        may_encode = [rank for rank in idle
                      if not running[rank] or view.last_stage.get(rank) != Stage.ENCODE]
        encode_for = self._place_new(view, may_encode)
        for rank in idle:
            if encode_for.get(rank):
                plans.append(Plan(Stage.ENCODE, [r.request_id for r in encode_for[rank]], (rank,)))
                continue
            if running[rank]:
                shape = running[rank][0].key
                batch = take_batch(running[rank], shape, view.batch_limit(Stage.DENOISE, shape, (rank,)))
                plans.append(Plan(Stage.DENOISE, [r.request_id for r in batch], (rank,),
                                  view.steps_per_task))
        return plans

    def _place_new(self, view: SchedulerView, ranks: list[int]) -> dict[int, list[Request]]:
        """Water-fill new requests onto the given free ranks by resident images."""
        placed: dict[int, list[Request]] = {rank: [] for rank in ranks}
        if not ranks:
            return placed
        load = {rank: view.load(rank) for rank in ranks}
        speed = {rank: view.speed((rank,)) for rank in ranks}
        encoded = dict.fromkeys(ranks, 0)
        for request in sorted(view.waiting(), key=self.sort_key):
            accepting = [r for r in ranks if view.accepts_new(r, request)]
            open_ranks = [r for r in accepting if not placed[r]
                          or encoded[r] + request.n <= view.batch_limit(Stage.ENCODE, request.key, (r,))]
            if not open_ranks:
                if accepting:
                    break  # every batch is full
                continue  # no room for this request's state; a smaller one may fit
            rank = min(open_ranks, key=lambda r: (load[r] / speed[r], r))
            placed[rank].append(request)
            load[rank] += request.n
            encoded[rank] += request.n
        return placed


class SRTFPolicy(FCFSPolicy):
    """Like fcfs, but the request with the fewest denoise steps left goes first."""

    name = "srtf"

    def sort_key(self, request: Request) -> tuple[Any, ...]:
        return (-request.params.priority, request.num_steps - request.step, request.arrival_time)


class StaticPolicy(FCFSPolicy):
    """What today's DiT servers do: fixed lanes of ``static_degree`` ranks, each running one
    request at a time from encode to decode, in arrival order.

    The ranks are cut into contiguous lanes ((0, 1), (2, 3), ... for degree 2); a request
    keeps its lane and degree for its whole life, so nothing ever migrates. With
    ``batch=True`` a lane batches same-shape requests like fcfs does.
    """

    name = "static"

    def __init__(self, static_degree: int = 1, batch: bool = False) -> None:
        if static_degree < 1:
            raise ValueError(f"static_degree must be >= 1, got {static_degree}")
        self.static_degree = static_degree
        self.batch = batch

    def lanes(self, num_workers: int) -> list[tuple[int, ...]]:
        k = self.static_degree
        return [tuple(range(start, start + k)) for start in range(0, num_workers - k + 1, k)]

    def validate(self, num_workers: int, degrees: tuple[int, ...]) -> None:
        if self.static_degree not in degrees:
            raise ValueError(f"static degree {self.static_degree} needs that many workers and must divide "
                             f"the model's attention heads; possible degrees: {degrees}")

    def plan(self, view: SchedulerView) -> list[Plan]:
        free = set(view.free_workers)
        waiting = sorted(view.waiting(), key=self.sort_key)
        plans: list[Plan] = []
        # A multi-rank lane on a device shared with a foreign job runs at that device's
        # pace: among equally loaded lanes, it takes new requests last.
        avoided = view.avoided() if self.static_degree > 1 else set()
        for lane in sorted(self.lanes(view.num_workers),
                           key=lambda g: (sum(view.load(r) for r in g), not avoided.isdisjoint(g))):
            if not free.issuperset(lane):
                continue
            ready = sorted(view.on_group(lane, denoised=True), key=self.sort_key)
            running = sorted(view.on_group(lane, denoised=False), key=self.sort_key)
            new_ok = bool(waiting) and all(view.accepts_new(r, waiting[0]) for r in lane)
            if ready:
                limit = view.batch_limit(Stage.DECODE, ready[0].key, lane) if self.batch else 1
                batch = take_batch(ready, ready[0].key, limit)
                plans.append(Plan(Stage.DECODE, [r.request_id for r in batch], lane))
            elif new_ok and (not running or (self.batch and view.last_stage.get(lane[0]) != Stage.ENCODE)):
                limit = view.batch_limit(Stage.ENCODE, waiting[0].key, lane)
                take = take_images(waiting, limit) if self.batch else waiting[:1]
                waiting = waiting[len(take):]
                plans.append(Plan(Stage.ENCODE, [r.request_id for r in take], lane))
            elif running:
                limit = view.batch_limit(Stage.DENOISE, running[0].key, lane)
                batch = take_batch(running, running[0].key, limit) if self.batch else running[:1]
                plans.append(Plan(Stage.DENOISE, [r.request_id for r in batch], lane, view.steps_per_task))
        return plans


def take_images(requests: list[Request], max_images: int) -> list[Request]:
    """The leading requests whose images fit in ``max_images`` (at least one)."""
    taken, images = [], 0
    for request in requests:
        if taken and images + request.n > max_images:
            break
        taken.append(request)
        images += request.n
    return taken


def _builtin() -> dict[str, type[Policy]]:
    from engine.scheduler.edf import EDFPolicy
    from engine.scheduler.elastic import ElasticPolicy

    return {p.name: p for p in (FCFSPolicy, SRTFPolicy, StaticPolicy, EDFPolicy, ElasticPolicy)}


POLICIES: dict[str, type[Policy]] = _builtin()


def make_policy(spec: str, cost_model: Any = None, **options: Any) -> Policy:
    """A built-in policy by name, or a user's own as ``package.module:ClassName``.

    ``cost_model`` (engine.scheduler.cost_model.CostModel) goes to policies whose
    constructor takes a ``cost_model`` argument and is left out for the others, so the
    engine and the simulator can offer it to any policy; other options pass as given.
    """
    if ":" in spec:
        module_name, _, class_name = spec.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot load policy {spec!r}: {exc}") from exc
        if not (isinstance(cls, type) and issubclass(cls, Policy)):
            raise ValueError(f"{spec!r} is not a subclass of engine.scheduler.policy.Policy")
    else:
        try:
            cls = POLICIES[spec]
        except KeyError:
            raise ValueError(f"unknown policy {spec!r}; choose one of {', '.join(POLICIES)} "
                             "or give module:Class") from None
    if cost_model is not None and _accepts(cls, "cost_model"):
        options["cost_model"] = cost_model
    try:
        return cls(**options)
    except TypeError as exc:
        raise ValueError(f"policy {spec!r}: {exc}") from None


def _accepts(cls: type, name: str) -> bool:
    parameters = inspect.signature(cls).parameters
    return name in parameters or any(p.kind == p.VAR_KEYWORD for p in parameters.values())
