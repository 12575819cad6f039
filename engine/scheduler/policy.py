"""The policy interface: what a policy sees (SchedulerView) and what it returns (Plan).

A policy decides order, batching, placement and degree; the Scheduler keeps the
book-keeping and checks every plan. Policies are pure: no I/O, no torch, no clock reads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar

from engine.messages import Stage
from engine.model_info import BatchKey
from engine.request import Request
from engine.scheduler.memory import MemoryModel


@dataclass
class Plan:
    """One task to start: a stage for a batch of requests on an ordered group of ranks."""

    stage: Stage
    request_ids: list[str]
    group: tuple[int, ...]
    num_steps: int = 1


@dataclass
class SchedulerView:
    """A read-only snapshot for the policy; ``requests`` are idle (not in a task), oldest first."""

    now: float
    free_workers: list[int]
    num_workers: int
    max_batch_size: int
    steps_per_task: int
    requests: list[Request]
    # Images whose state lives on each rank, in a task or not (the rank's load).
    resident_images: dict[int, int] = field(default_factory=dict)
    # The stage of the last task each rank ran.
    last_stage: dict[int, Stage] = field(default_factory=dict)
    # Sequence-parallel degrees a denoise group may have (they divide the model's heads).
    degrees: tuple[int, ...] = (1,)
    # Requests in a running task (not plannable now, but they still compete for the workers).
    running: list[Request] = field(default_factory=list)
    # Relative speed of each rank (1.0 nominal, 0.5 half speed; missing: 1.0), e.g. from
    # telemetry when a foreign job shares the device. A group runs at its slowest member.
    rank_speed: dict[int, float] = field(default_factory=dict)
    # Most image-token rows one rank computes in a denoise batch (rows x image tokens /
    # degree, rows = images, x2 with CFG); the first request always fits. None: no cap.
    max_batch_tokens: int | None = None
    # Telemetry (device_state.py; empty: none). Ranks on a device shared with a foreign
    # process: multi-rank groups take them last.
    interfered: frozenset[int] = frozenset()
    # Ranks whose device memory is nearly full: they get no new requests.
    nearly_full: frozenset[int] = frozenset()
    # Bytes a task may still allocate on each rank's device; missing: unknown, no limit.
    headroom: dict[int, int] = field(default_factory=dict)
    # Predicts a task's activation memory (memory.py); None: no memory admission.
    memory: MemoryModel | None = None
    # False: a request's state cannot leave the ranks that hold it (plans moving it are dropped).
    state_transfer: bool = True

    def waiting(self) -> list[Request]:
        """Requests not yet encoded (no state anywhere)."""
        return [r for r in self.requests if r.stage == Stage.ENCODE]

    def on_rank(self, rank: int, *, denoised: bool) -> list[Request]:
        """Idle requests whose state lives on ``rank`` alone, still denoising or ready to decode."""
        return self.on_group((rank,), denoised=denoised)

    def on_group(self, group: tuple[int, ...], *, denoised: bool) -> list[Request]:
        """Idle requests whose state lives exactly on ``group``."""
        stage = Stage.DECODE if denoised else Stage.DENOISE
        return [r for r in self.requests if r.location == group and r.stage == stage]

    def load(self, rank: int) -> int:
        return self.resident_images.get(rank, 0)

    def speed(self, group: tuple[int, ...]) -> float:
        return min((self.rank_speed.get(rank, 1.0) for rank in group), default=1.0)

    def avoided(self) -> set[int]:
        """Ranks a multi-rank group takes last: interfered or slowed."""
        return set(self.interfered) | {rank for rank, speed in self.rank_speed.items() if speed < 1.0}

    def batch_limit(self, stage: Stage, key: BatchKey, group: tuple[int, ...]) -> int:
        """Most images of batch ``key`` in one ``stage`` task on ``group``: ``max_batch_size``,
        capped by ``max_batch_tokens`` (denoise) and so the predicted activation memory fits
        every member's headroom. Where a member's headroom is known but the stage's memory
        is not yet, one request."""
        limit = self.max_batch_size
        degree = len(group) if stage == Stage.DENOISE else 1
        if stage == Stage.DENOISE and self.max_batch_tokens is not None:
            limit = min(limit, max(1, int(self.max_batch_tokens // (key.token_rows / degree))))
        if self.memory is None:
            return limit
        for rank in group:
            headroom = self.headroom.get(rank)
            if headroom is None:
                continue
            fits = self.memory.max_images(stage, key, degree, headroom)
            limit = min(limit, 1 if fits is None else fits)
        return limit

    @cached_property
    def memory_will_free(self) -> bool:
        """Whether some request holds state or runs: its end frees device memory."""
        return bool(self.running) or any(r.location is not None for r in self.requests)

    def accepts_new(self, rank: int, request: Request) -> bool:
        """Whether ``rank`` may take ``request``'s new state: not nearly full, and one denoise
        step of the request alone fits its headroom (when both are known). When none of
        our requests holds memory, waiting would free nothing: then every rank may."""
        headroom = self.headroom.get(rank)
        need = None
        if headroom is not None and self.memory is not None:
            need = self.memory.activation_bytes(Stage.DENOISE, request.key, request.n, 1)
        if rank not in self.nearly_full and (need is None or need <= headroom):  # type: ignore[operator]
            return True
        return not self.memory_will_free


def take_batch(candidates: Iterable[Request], key: BatchKey, max_images: int) -> list[Request]:
    """Requests of batch ``key`` in the given order while their images fit in ``max_images``.

    The first request always fits, so a request with n > max_images still runs alone.
    """
    batch: list[Request] = []
    images = 0
    for r in candidates:
        if r.key != key:
            continue
        if batch and images + r.n > max_images:
            continue
        batch.append(r)
        images += r.n
    return batch


class Policy(ABC):
    """Turns a SchedulerView into plans. Subclass and register to add a policy."""

    name: ClassVar[str]

    @abstractmethod
    def plan(self, view: SchedulerView) -> list[Plan]: ...

    def validate(self, num_workers: int, degrees: tuple[int, ...]) -> None:
        """Raise ValueError if the policy cannot run on this many workers with these degrees."""
        return None
