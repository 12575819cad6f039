"""Built-in scheduling policies and the registry that ``--policy`` selects from."""

from __future__ import annotations

import importlib
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
                batch = take_batch(ready, ready[0].shape, view.max_batch_size)
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
                batch = take_batch(running[rank], running[rank][0].shape, view.max_batch_size)
                plans.append(Plan(Stage.DENOISE, [r.request_id for r in batch], (rank,),
                                  view.steps_per_task))
        return plans

    def _place_new(self, view: SchedulerView, ranks: list[int]) -> dict[int, list[Request]]:
        """Water-fill new requests onto the given free ranks by resident images."""
        placed: dict[int, list[Request]] = {rank: [] for rank in ranks}
        if not ranks:
            return placed
        load = {rank: view.load(rank) for rank in ranks}
        encoded = dict.fromkeys(ranks, 0)
        for request in sorted(view.waiting(), key=self.sort_key):
            open_ranks = [r for r in ranks if not placed[r] or encoded[r] + request.n <= view.max_batch_size]
            if not open_ranks:
                break
            rank = min(open_ranks, key=lambda r: (load[r], r))
            placed[rank].append(request)
            load[rank] += request.n
            encoded[rank] += request.n
        return placed


class SRTFPolicy(FCFSPolicy):
    """Like fcfs, but the request with the fewest denoise steps left goes first."""

    name = "srtf"

    def sort_key(self, request: Request) -> tuple[Any, ...]:
        return (-request.params.priority, request.num_steps - request.step, request.arrival_time)


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (FCFSPolicy, SRTFPolicy)}


def make_policy(spec: str, **options: Any) -> Policy:
    """A built-in policy by name, or a user's own as ``package.module:ClassName``."""
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
    return cls(**options)
