"""What the engine reports to its observers: one record per finished task and per ended request.

Observers (Prometheus metrics, a benchmark's recorder) see the engine without reaching
into its book-keeping. The engine calls them synchronously on its event loop, so an
observer must be cheap; one that raises is logged and otherwise ignored, since a broken
metric must never fail a request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from engine.messages import Stage
from engine.request import RequestStatus


@dataclass(frozen=True)
class TaskStats:
    stage: Stage
    # Images in the batch (the sum of the requests' n): the unit the transformer batches.
    images: int
    # Sequence-parallel degree: the number of ranks that computed the task.
    degree: int
    # Denoise steps the task ran (1 for encode and decode).
    num_steps: int
    # Time the group leader spent on the task, as the worker measured it.
    elapsed_s: float
    failed: bool = False
    # Device memory on the leader (0 and None on CPU): the measured peak, and the peak the
    # scheduler predicted (memory held when the task began + predicted activations).
    peak_memory_bytes: int = 0
    predicted_peak_bytes: int | None = None


@dataclass(frozen=True)
class RequestStats:
    request_id: str
    # FINISHED, FAILED or ABORTED.
    status: RequestStatus
    # Images delivered (0 unless finished).
    images: int
    # From arrival to the end.
    latency_s: float
    # From arrival to its first task; None if it never ran.
    queue_wait_s: float | None
    # Denoise steps done that ran every block, and those that reused a step-cache residual.
    computed_steps: int = 0
    cached_steps: int = 0


class EngineObserver(Protocol):
    def on_task(self, stats: TaskStats) -> None: ...

    def on_request(self, stats: RequestStats) -> None: ...


def notify_observers(observers: Iterable[EngineObserver], call: Callable[[EngineObserver], None]) -> None:
    """Call every observer; one that raises is logged, never passed on to the request."""
    for observer in observers:
        try:
            call(observer)
        except Exception:  # noqa: BLE001 - a broken metric must not fail requests
            logging.getLogger(__name__).exception("engine observer %r failed", observer)
