"""What the engine and a worker process say to each other, as msgspec tagged unions.

Every message crosses a shared-memory ring (engine/executor/shm_queue.py) msgpack-encoded;
nothing is pickled. The life of a worker process::

    engine                                    worker
    spawn(WorkerSpec)  --------------------->  load the model
                       <---------------------  Ready(model info)    or StartFailed(message)
    JoinWorld(epoch)   --------------------->  torch.distributed over the world, barrier
                       <---------------------  Joined(epoch)        or JoinFailed(epoch, message)
    Task / FreeRequests ... ---------------->  run / drop state
                       <---------------------  TaskResult ...
    JoinWorld(epoch+1) --------------------->  (after a peer was replaced) leave, join again
                       <---------------------  Leaving(reason), exit 75   (a task left it unfit)
    Shutdown           --------------------->  leave the world, exit 0
"""

from __future__ import annotations

from typing import Union

import msgspec

from engine.config import ModelConfig
from engine.distributed.shm_channels import WorldSpec
from engine.messages import FreeRequests, LoraAnswer, LoraCommand, ModelInfo, Task, TaskResult

_WIRE = {"array_like": True, "omit_defaults": True, "gc": False, "tag": True}

# A worker's exit status when a task left it unfit to go on (a sticky CUDA error, or a
# failed multi-rank task whose collectives may be out of step); see worker_main.py.
EXIT_REPLACE_ME = 75


class WorkerSpec(msgspec.Struct, kw_only=True):
    """Everything a worker process needs to start; extend it rather than adding arguments.

    Travels as JSON on the command line. The descriptors are inherited with ``pass_fds``.
    """

    rank: int
    world_size: int
    # The world the worker will be asked to join first (informational; JoinWorld decides).
    epoch: int
    model: ModelConfig
    # This rank's device: cpu, or cuda:<index> (one GPU per worker).
    device: str
    # torch intra-op threads; None: torch's default.
    threads: int | None
    # torch.distributed rendezvous: a TCPStore served by the engine process.
    store_host: str
    store_port: int
    join_timeout_s: float
    # (memory, data eventfd, space eventfd) of the engine -> worker and worker -> engine rings.
    cmd_fds: tuple[int, int, int]
    out_fds: tuple[int, int, int]
    ring_capacity: int
    # Read end of a pipe whose write end only the engine holds: EOF means the engine is gone.
    parent_fd: int
    parent_pid: int
    log_level: int = 20
    # "module:function" called with the Worker once the model is loaded (profilers,
    # custom attention processors, fault injection in tests).
    worker_hook: str | None = None
    # (name, path) of the LoRA adapters to load before Ready: the start-up ones, or for a
    # replacement worker the ones resident on its peers.
    loras: list[tuple[str, str]] = []


class JoinWorld(msgspec.Struct, **_WIRE):
    """(Re-)form the torch.distributed world: leave the old one, join ``epoch``'s.

    ``channels`` names this epoch's shared-memory channels for the group-free collectives
    of CPU workers (a fresh segment per epoch: a rank that died may have left a channel half
    written); None on GPU, where they run over the world's NCCL communicator.
    """

    epoch: int
    world_size: int
    channels: WorldSpec | None = None


class Shutdown(msgspec.Struct, **_WIRE):
    pass


class Ready(msgspec.Struct, **_WIRE):
    """The model is loaded; the worker waits for JoinWorld."""

    info: ModelInfo
    pid: int


class StartFailed(msgspec.Struct, **_WIRE):
    message: str


class Leaving(msgspec.Struct, **_WIRE):
    """The worker exits (EXIT_REPLACE_ME) instead of answering its task; ``reason`` says why."""

    reason: str


class Joined(msgspec.Struct, **_WIRE):
    epoch: int


class JoinFailed(msgspec.Struct, **_WIRE):
    epoch: int
    message: str


ToWorker = Union[Task, FreeRequests, LoraCommand, JoinWorld, Shutdown]  # noqa: UP007 - a runtime type for msgspec
FromWorker = Union[TaskResult, LoraAnswer, Ready, StartFailed, Joined, JoinFailed, Leaving]  # noqa: UP007

encoder = msgspec.msgpack.Encoder()
to_worker_decoder = msgspec.msgpack.Decoder(ToWorker)
from_worker_decoder = msgspec.msgpack.Decoder(FromWorker)


def encode_spec(spec: WorkerSpec) -> str:
    return msgspec.json.encode(spec).decode()


def decode_spec(text: str) -> WorkerSpec:
    return msgspec.json.decode(text, type=WorkerSpec)
