"""The engine's book-keeping of a request (Request) and its status.

The user parameters live in engine/params.py (re-exported here for older imports).
"""

from __future__ import annotations

import enum

from engine.messages import Stage
from engine.model_info import BatchKey
from engine.params import (
    MAX_SEED,
    OUTPUT_FORMATS,
    ImageParams,
    InvalidParamsError,
    Limits,
    check_prompt,
)

__all__ = ["MAX_SEED", "OUTPUT_FORMATS", "BatchKey", "ImageParams", "InvalidParamsError", "Limits", "Request",
           "RequestStatus", "check_prompt"]


class RequestStatus(enum.IntEnum):
    WAITING = 0  # admitted, not yet encoded
    RUNNING = 1  # state lives on a worker (denoising or waiting to decode)
    FINISHED = 2
    ABORTED = 3
    FAILED = 4

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED


class Request:
    """The engine's book-keeping of one request; the tensors live on the workers."""

    def __init__(self, request_id: str, prompt: str, params: ImageParams, key: BatchKey,
                 arrival_time: float) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.key = key
        self.arrival_time = arrival_time
        self.status = RequestStatus.WAITING
        self.step = 0  # denoise steps done
        self.cached_steps = 0  # of those, steps that reused their step-cache residual
        self.location: tuple[int, ...] | None = None  # ranks that hold the request's state
        self.task_id: int | None = None  # the task it is in, if any
        self.first_scheduled_time: float | None = None
        self.finished_time: float | None = None
        self.error: str | None = None
        self.retries = 0  # times it started over after losing its worker
        self.deadline = None if params.deadline_s is None else arrival_time + params.deadline_s

    @property
    def stage(self) -> Stage | None:
        """The stage the request runs next; None once it has ended.

        Without state anywhere it must be encoded; with state, it denoises until every
        step is done, then decodes.
        """
        if self.status.is_finished:
            return None
        if self.location is None:
            return Stage.ENCODE
        return Stage.DECODE if self.step >= self.num_steps else Stage.DENOISE

    @property
    def denoised(self) -> bool:
        """All steps done, waiting for the VAE."""
        return self.stage == Stage.DECODE

    @property
    def tokens(self) -> int:
        """Image tokens of one of its images (the model's latent geometry, via its key)."""
        return self.key.tokens

    @property
    def num_steps(self) -> int:
        return self.params.num_inference_steps  # type: ignore[return-value]

    @property
    def computed_steps(self) -> int:
        """Denoise steps done that ran every transformer block."""
        return self.step - self.cached_steps

    @property
    def cache_hit_rate(self) -> float:
        """The share of its steps so far that its step cache reused: what the cost model
        expects of its remaining steps (0 before its first step, or without a cache)."""
        return self.cached_steps / self.step if self.step and self.params.cache is not None else 0.0

    @property
    def n(self) -> int:
        return self.params.n

    @property
    def in_flight(self) -> bool:
        return self.task_id is not None

    def __repr__(self) -> str:
        return (f"Request({self.request_id[:8]}, {self.status.name}, step {self.step}/{self.num_steps}, "
                f"at {self.location})")
