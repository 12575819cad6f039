"""Loading and unloading LoRA adapters at run time, on every worker of an engine.

A mixin of ``AsyncEngine``: it reads the engine's executor, model description and adapter
book (``LoraRegistry``); one lock keeps loads and unloads from interleaving.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from engine.errors import EngineDeadError
from engine.lora_registry import LoraBusyError, LoraEntry, LoraRegistry
from engine.params import InvalidParamsError

if TYPE_CHECKING:
    from engine.executor.base import Executor
    from engine.messages import ModelInfo

logger = logging.getLogger("engine.async_engine")


class LoraAdmin:
    executor: Executor
    model_info: ModelInfo | None
    loras: LoraRegistry
    _lora_lock: asyncio.Lock

    async def load_lora(self, name: str, path: str) -> dict:
        """Load an adapter on every worker (unloading least-recently-used idle ones past
        max_loras). Raises InvalidParamsError (bad name or file), LoraPathError (outside
        lora_dir), LoraBusyError (every resident adapter in use)."""
        if self.model_info is None:
            raise EngineDeadError("the engine is not started")
        LoraRegistry.check_name(name)
        real = self.loras.resolve_path(path)
        if self.model_info.backend == "pipeline":
            raise InvalidParamsError(f"model {self.model_info.name} runs through the whole-pipeline fallback, "
                                     "which has no per-request LoRA", "path")
        async with self._lora_lock:
            old = self.loras.entries.get(name)
            if old is not None and old.users:
                raise LoraBusyError(f"adapter {name!r} is in use by {len(old.users)} running request(s)")
            # Victims go only once the new adapter loaded: a bad file costs no resident one.
            victims = self.loras.evictions_for(name)
            answers = await self.executor.lora_command(name, real)
            errors = [a.error for a in answers if a.error]
            if errors or not answers:
                await self.executor.lora_command(name, None)  # no worker keeps half of it
                self.loras.remove(name)
                self.executor.loras.pop(name, None)
                raise InvalidParamsError(f"adapter {name!r} not loaded: {errors[0] if errors else 'no worker'}",
                                         "path")
            for victim in victims:
                logger.info("unloading LoRA adapter %s (least recently used) to make room for %s", victim, name)
                await self._unload_locked(victim)
            first = answers[0]
            entry = LoraEntry(name, real, first.modules, first.rank_max, first.parameters)
            self.loras.add(entry)
            self.executor.loras[name] = real
            logger.info("loaded LoRA adapter %s from %s (%d modules, rank %d)", name, real, entry.modules,
                        entry.rank)
            return entry.describe()

    async def unload_lora(self, name: str) -> None:
        """Unload an adapter from every worker. Raises KeyError (not loaded) and
        LoraBusyError (a live request uses it: it is never taken from under one)."""
        async with self._lora_lock:
            await self._unload_locked(name)

    async def _unload_locked(self, name: str) -> None:
        self.loras.check_unload(name)
        # Out of the book first: from here no new request may name it.
        self.loras.remove(name)
        self.executor.loras.pop(name, None)
        await self.executor.lora_command(name, None)

    def list_loras(self) -> list[dict]:
        return self.loras.describe()
