"""Messages that cross process boundaries (engine <-> workers), as msgspec Structs.

They are plain data: tensors never travel in them (latents stay on the worker that holds a
request's state); images travel as encoded bytes. The messages that travel alone between
the engine and a worker process are tagged, so a union of them decodes without a wrapper
(see engine/executor/protocol.py).
"""

from __future__ import annotations

import enum

import msgspec

from engine.model_info import ModelInfo
from engine.params import ImageParams

__all__ = ["FreeRequests", "ImageData", "ItemResult", "LoraAnswer", "LoraCommand", "Migration", "ModelInfo",
           "NewRequest", "Stage", "Task", "TaskResult"]

_WIRE = {"array_like": True, "omit_defaults": True, "gc": False}


class Stage(enum.IntEnum):
    ENCODE = 0  # text encoders + initial latents; the request's state is created
    DENOISE = 1  # num_steps transformer steps
    DECODE = 2  # VAE + image encoding; the request's state is freed


class NewRequest(msgspec.Struct, **_WIRE):
    request_id: str
    prompt: str
    params: ImageParams


class Migration(msgspec.Struct, **_WIRE):
    """Copy a request's state (latents, embeddings, scheduler) from ``src`` to ``dsts``."""

    request_id: str
    src: int
    dsts: tuple[int, ...]


class Task(msgspec.Struct, tag=True, **_WIRE):
    """One unit of work for a group of workers; ``group[0]`` reports the requests' progress.

    ``group`` is the ordered tuple of ranks that compute (the sequence-parallel group).
    Migrations run first; a migration source outside the group takes part only to send,
    then drops its copy. Every rank in ``members`` receives the task and answers it.
    """

    task_id: int
    stage: Stage
    request_ids: list[str]
    group: tuple[int, ...]
    num_steps: int = 1
    new_requests: list[NewRequest] = []
    migrations: list[Migration] = []

    @property
    def members(self) -> tuple[int, ...]:
        extra = sorted({m.src for m in self.migrations} - set(self.group))
        return self.group + tuple(extra)


class FreeRequests(msgspec.Struct, tag=True, **_WIRE):
    """Drop the state of these requests (aborted, or their task was lost)."""

    request_ids: list[str]


class ImageData(msgspec.Struct, **_WIRE):
    data: bytes
    format: str
    width: int
    height: int


class ItemResult(msgspec.Struct, **_WIRE):
    """What a task did to one request."""

    request_id: str
    step: int
    error: str | None = None
    images: list[ImageData] = []
    # Previews of the latents after ``step`` (one per image), when the request asked for them.
    previews: list[ImageData] = []
    latents: bytes | None = None
    latents_shape: list[int] = []
    # Of the request's ``step`` steps so far, how many reused their cached residual.
    cached_steps: int = 0


class TaskResult(msgspec.Struct, tag=True, **_WIRE):
    task_id: int
    rank: int
    items: list[ItemResult] = []
    # Set when the whole task failed (every request in it fails with this message).
    error: str | None = None
    elapsed_s: float = 0.0
    # Device memory on this rank (0 on CPU): allocated when the task began, the peak
    # during it, and what the caching allocator held unused when it ended. Peak minus
    # start is the task's activation memory, which the scheduler learns from.
    peak_memory_bytes: int = 0
    start_memory_bytes: int = 0
    cached_memory_bytes: int = 0



class LoraCommand(msgspec.Struct, tag=True, **_WIRE):
    """Load (``path`` set) or unload (``path`` None) a LoRA adapter on a worker. Commands
    and tasks share the worker's ordered ring, so a task sent after a load sees the adapter
    and one sent before an unload still has it."""

    command_id: int
    name: str
    path: str | None = None


class LoraAnswer(msgspec.Struct, tag=True, **_WIRE):
    command_id: int
    rank: int
    error: str | None = None
    modules: int = 0
    rank_max: int = 0
    parameters: int = 0
