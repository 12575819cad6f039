"""The engine's book of LoRA adapters: which are resident, who uses them, where files may come from.

Pure (no torch): the workers hold the weights (engine/models/lora.py); this decides.

- Paths are confined to ``lora_dir``: a name is resolved inside it, ``..`` and absolute
  paths elsewhere are refused, and so is a symlink whose target leaves it (the check is on
  the resolved path).
- At most ``max_loras`` stay resident; loading one more first unloads the least recently
  used adapter that no live request names. When every resident adapter is in use the
  load is refused rather than breaking a request.
- An adapter a live request names is never unloaded: ``check_unload`` refuses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.params import InvalidParamsError, LoraRef

NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class LoraPathError(ValueError):
    """An adapter path outside the allowed folder (the API's 403)."""


class LoraBusyError(RuntimeError):
    """The adapter (or every adapter, for an eviction) is in use by a live request (409)."""


@dataclass
class LoraEntry:
    name: str
    path: str
    modules: int = 0
    rank: int = 0
    parameters: int = 0
    last_used: float = field(default_factory=time.monotonic)
    users: set[str] = field(default_factory=set)

    def describe(self) -> dict:
        return {"name": self.name, "path": self.path, "modules": self.modules, "rank": self.rank,
                "parameters": self.parameters, "requests": len(self.users)}


class LoraRegistry:
    def __init__(self, lora_dir: str | None, max_loras: int) -> None:
        if max_loras < 1:
            raise ValueError("max_loras must be >= 1")
        self.root = Path(lora_dir or ".").resolve()
        self.max_loras = max_loras
        self.entries: dict[str, LoraEntry] = {}
        self._requests: dict[str, tuple[str, ...]] = {}

    # ----- files ---------------------------------------------------------------------
    @staticmethod
    def check_name(name: object) -> str:
        if not isinstance(name, str) or not name or len(name) > 64 or not set(name) <= NAME_CHARS:
            raise InvalidParamsError("a LoRA name is 1-64 letters, digits, '-', '_' or '.'", "name")
        return name

    def resolve_path(self, path: object) -> str:
        """The adapter's real path inside ``lora_dir``; raises LoraPathError otherwise."""
        if not isinstance(path, str) or not path:
            raise InvalidParamsError("path must be a non-empty string", "path")
        given = Path(path)
        if ".." in given.parts:
            raise LoraPathError(f"adapter path {path!r} may not contain '..'")
        real = (self.root / given).resolve()
        if real != self.root and self.root not in real.parents:
            raise LoraPathError(f"adapter path {path!r} is outside the LoRA folder")
        return str(real)

    @staticmethod
    def parse_startup(spec: str) -> tuple[str, str]:
        name, sep, path = spec.partition("=")
        if not sep:
            raise ValueError(f"--lora takes NAME=PATH, got {spec!r}")
        return LoraRegistry.check_name(name.strip()), path.strip()

    # ----- residency -----------------------------------------------------------------
    def add(self, entry: LoraEntry) -> None:
        self.entries[entry.name] = entry

    def evictions_for(self, name: str) -> list[str]:
        """Adapters to unload before ``name`` is loaded; raises LoraBusyError if none can go."""
        if name in self.entries or len(self.entries) < self.max_loras:
            return []
        idle = sorted((e for e in self.entries.values() if not e.users), key=lambda e: e.last_used)
        excess = len(self.entries) + 1 - self.max_loras
        if len(idle) < excess:
            raise LoraBusyError(f"{len(self.entries)} adapters are resident (max_loras) and all are in use")
        return [e.name for e in idle[:excess]]

    def check_unload(self, name: str) -> LoraEntry:
        entry = self.entries.get(name)
        if entry is None:
            raise KeyError(name)
        if entry.users:
            raise LoraBusyError(f"adapter {name!r} is in use by {len(entry.users)} running request(s)")
        return entry

    def remove(self, name: str) -> None:
        self.entries.pop(name, None)

    # ----- requests ------------------------------------------------------------------
    def check_known(self, refs: tuple[LoraRef, ...]) -> None:
        unknown = [r.name for r in refs if r.name not in self.entries]
        if unknown:
            raise InvalidParamsError(f"unknown LoRA adapter(s): {', '.join(unknown)}; loaded: "
                                     f"{', '.join(sorted(self.entries)) or 'none'}", "loras")

    def acquire(self, request_id: str, refs: tuple[LoraRef, ...]) -> None:
        """Mark the request's adapters in use; raises InvalidParamsError for unknown names."""
        if not refs:
            return
        self.check_known(refs)
        now = time.monotonic()
        for ref in refs:
            entry = self.entries[ref.name]
            entry.users.add(request_id)
            entry.last_used = now
        self._requests[request_id] = tuple(r.name for r in refs)

    def release(self, request_id: str) -> None:
        for name in self._requests.pop(request_id, ()):
            entry = self.entries.get(name)
            if entry is not None:
                entry.users.discard(request_id)

    def describe(self) -> list[dict]:
        return [e.describe() for e in sorted(self.entries.values(), key=lambda e: e.name)]
