"""Shared helpers for the benchmark scripts: statistics, JSON output and the final table."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Summary:
    count: int
    mean: float
    median: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        if not values:
            return cls(0, math.nan, math.nan, math.nan, math.nan)
        ordered = sorted(values)
        return cls(len(ordered), sum(ordered) / len(ordered), percentile(ordered, 50),
                   percentile(ordered, 90), percentile(ordered, 99))


def percentile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default) on sorted values."""
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def print_table(title: str, rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    print(f"\n{title}")
    for k, row in enumerate(rows):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))
        if k == 0:
            print("  ".join("-" * width for width in widths))


def write_json(path: str | None, figures: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")


class CallTimer:
    """Times every call of a module: device time (CUDA events) on a GPU, wall time on a CPU.

    Hooks sit on the module, so a model runs exactly as it would untimed; ``seconds()``
    waits for the device and returns the calls made since the last ``clear()``.
    """

    def __init__(self, module: Any) -> None:
        import torch

        self._torch = torch
        self._cuda = next(module.parameters()).device.type == "cuda"
        self._marks: list[tuple[Any, Any]] = []
        self._open: Any = None
        self._handles = [module.register_forward_pre_hook(self._start),
                         module.register_forward_hook(self._stop)]

    def _now(self) -> Any:
        if self._cuda:
            event = self._torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        import time

        return time.perf_counter()

    def _start(self, *_: Any) -> None:
        self._open = self._now()

    def _stop(self, *_: Any) -> None:
        self._marks.append((self._open, self._now()))

    def seconds(self) -> list[float]:
        if self._cuda:
            self._torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in self._marks]
        return [b - a for a, b in self._marks]

    def clear(self) -> None:
        self._marks.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
