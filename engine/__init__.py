"""gfdit's engine: everything below the public API.

Exports are resolved lazily so that importing a light module (the scheduler, the
request types) does not pull in torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AsyncEngine": "engine.async_engine",
    "EngineDeadError": "engine.async_engine",
    "EngineConfig": "engine.config",
    "ImageParams": "engine.params",
    "InvalidParamsError": "engine.params",
    "RequestOutput": "engine.outputs",
    "GeneratedImage": "engine.outputs",
    "RequestFailedError": "engine.outputs",
    "RequestAbortedError": "engine.outputs",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
