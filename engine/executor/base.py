"""The executor interface: how the engine loop reaches its workers.

The engine never waits on an executor call: ``submit`` and ``free`` return at once, and
results arrive through the ``on_result`` callback, invoked on the event loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from engine.config import EngineConfig
from engine.messages import LoraAnswer, ModelInfo, Task, TaskResult

ResultCallback = Callable[[TaskResult], None]
# (rank, message): a worker died; the engine fails or restarts what it held.
FailureCallback = Callable[[int, str], None]
# rank: a worker that died is back (empty) and can take tasks.
RestartCallback = Callable[[int], None]


class Executor(ABC):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        # LoRA adapters resident on every worker, name -> path: loaded by workers that start
        # (or restart) and kept up to date by the engine's LoraRegistry.
        self.loras: dict[str, str] = {}

    @property
    @abstractmethod
    def num_workers(self) -> int: ...

    @abstractmethod
    async def start(self, on_result: ResultCallback, on_failure: FailureCallback,
                    on_restart: RestartCallback) -> ModelInfo:
        """Start the workers and load the model; returns what the engine needs to know of it."""

    @abstractmethod
    def submit(self, task: Task) -> None:
        """Send a task to every rank of its group."""

    @abstractmethod
    def free(self, rank: int, request_ids: list[str]) -> None:
        """Tell a rank to drop the state of these requests."""

    @abstractmethod
    async def lora_command(self, name: str, path: str | None) -> list[LoraAnswer]:
        """Load (or with ``path`` None unload) an adapter on every live worker; their answers."""

    @abstractmethod
    async def shutdown(self) -> None: ...

    @property
    def healthy(self) -> bool:
        return True

    def worker_pids(self) -> dict[int, int]:
        """rank -> process id of each live worker (telemetry counts other processes as foreign)."""
        return {}
