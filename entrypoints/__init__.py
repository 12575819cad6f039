"""gfdit's front ends: the Python API (DiT), the HTTP server and the command line."""

from __future__ import annotations

from typing import Any

__all__ = ["DiT", "ImageOutput"]


def __getattr__(name: str) -> Any:
    # Lazy, so `gfdit --help` does not import torch.
    if name in __all__:
        from entrypoints import offline

        return getattr(offline, name)
    raise AttributeError(f"module 'entrypoints' has no attribute {name!r}")
