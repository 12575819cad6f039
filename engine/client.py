"""The engine client: what a front end needs from "an engine", wherever it runs.

The API server (and anything else that serves requests) talks to this interface only.
``AsyncEngine`` implements it in process; ``entrypoints.ray_serve.RayEngineClient``
implements it over engine replicas on Ray Serve. A front end therefore never reaches
into a scheduler or an executor: load, health and extra metrics come through here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from engine.config import EngineConfig
from engine.messages import ModelInfo
from engine.outputs import RequestOutput
from engine.params import ImageParams
from engine.stats import EngineObserver

if TYPE_CHECKING:
    from prometheus_client.registry import Collector


@dataclass(frozen=True)
class EngineLoad:
    """Requests held, as the engine (or the client in front of its replicas) counts them."""

    waiting: int
    """Admitted, not started yet."""
    running: int
    """Started (state on a worker, or a replica has reported progress), not ended."""


@dataclass(frozen=True)
class Unhealthy:
    """Why an engine cannot serve now; ``code`` is the API error code."""

    code: str
    message: str


@runtime_checkable
class EngineClient(Protocol):
    config: EngineConfig
    model_info: ModelInfo | None

    @property
    def num_unfinished(self) -> int: ...

    def resolve_params(self, params: ImageParams | None) -> ImageParams:
        """Fill the model's defaults in and validate; raises InvalidParamsError."""
        ...

    def generate(self, prompt: str, params: ImageParams | None = None, request_id: str | None = None, *,
                 progress: bool = True) -> AsyncIterator[RequestOutput]:
        """Progress outputs (only those that carry previews when ``progress`` is False), then
        the final output. Closing the stream aborts the request."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def load(self) -> EngineLoad: ...

    async def health(self, stall_timeout_s: float) -> Unhealthy | None:
        """None while the engine serves and makes progress."""
        ...

    def add_observer(self, observer: EngineObserver) -> None:
        """Report every finished task and ended request to ``observer`` (e.g. metrics)."""
        ...

    def metric_collectors(self) -> list[Collector]:
        """Prometheus collectors only this kind of engine can fill (devices, replicas)."""
        ...

    def device_summary(self) -> str: ...

    async def shutdown(self) -> None: ...
