"""Resident LoRA adapters applied per row inside one batched transformer call.

Base weights are never merged: merging would force one adapter per call. Instead every
``nn.Linear`` some resident adapter targets gets a forward hook that adds, for each
adapter the current call uses, ``x[rows] @ A^T @ B^T * scale[rows]`` to the rows using it
(gather, two skinny matmuls, scatter-add). Rows of requests with other adapters, or none,
are untouched, so requests with different adapters share a denoise call.

The call's row assignment is set by the adapter around its transformer call
(``LoraStore.rows``). Rows are the batch dimension of every targeted layer's input; under
classifier-free guidance they are ``[uncond..., cond...]`` and both halves carry the
request's adapters (diffusers applies LoRA to both passes); under sequence parallelism
every member holds all rows of its shard of the sequence, so the assignment is the same
on every member.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.models.lora_files import LoraFactors, LoraFileError, read_lora
from engine.params import LoraRef


@dataclass
class _Group:
    """The rows of one call that use one adapter, and each row's user scale."""

    index: torch.Tensor
    scales: torch.Tensor


@dataclass(frozen=True)
class LoraSummary:
    name: str
    modules: int
    rank: int
    parameters: int


class LoraStore:
    """A worker's resident adapters for one transformer, and the current call's rows."""

    def __init__(self, transformer: nn.Module, pipeline_class: type) -> None:
        self.transformer = transformer
        self.pipeline_class = pipeline_class
        self.adapters: dict[str, dict[str, LoraFactors]] = {}
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._groups: dict[str, _Group] = {}
        self._rows = 0
        # The call's full assignment while step caching runs later blocks on fewer rows.
        self._full: tuple[dict[str, _Group], int] | None = None

    # ----- residency -----------------------------------------------------------------
    def load(self, name: str, path: str | Path) -> LoraSummary:
        """Read and keep an adapter (replacing one of the same name); raises LoraFileError."""
        factors = read_lora(path, self.pipeline_class, self.transformer)
        self.adapters[name] = factors
        for module in factors:
            if module not in self._hooks:
                layer = self.transformer.get_submodule(module)
                self._hooks[module] = layer.register_forward_hook(self._hook(module))
        return summarize(name, factors)

    def unload(self, name: str) -> bool:
        gone = self.adapters.pop(name, None)
        if gone is None:
            return False
        used = {m for factors in self.adapters.values() for m in factors}
        for module in [m for m in self._hooks if m not in used]:
            self._hooks.pop(module).remove()
        return True

    # ----- one call ------------------------------------------------------------------
    @contextlib.contextmanager
    def rows(self, row_loras: Sequence[Sequence[LoraRef]], device: torch.device,
             dtype: torch.dtype) -> Iterator[None]:
        """Apply ``row_loras[i]`` to row i of every targeted layer during the block."""
        members: dict[str, tuple[list[int], list[float]]] = {}
        for row, refs in enumerate(row_loras):
            for ref in refs:
                if ref.name not in self.adapters:
                    raise LoraFileError(f"adapter {ref.name!r} is not loaded on this worker")
                index, scales = members.setdefault(ref.name, ([], []))
                index.append(row)
                scales.append(ref.scale)
        self._groups = {name: _Group(torch.tensor(index, device=device),
                                     torch.tensor(scales, device=device, dtype=dtype))
                        for name, (index, scales) in members.items()}
        self._rows = len(row_loras)
        try:
            yield
        finally:
            self._groups = {}
            self._rows = 0
            self._full = None

    def narrow(self, keep: list[int] | None) -> None:
        """From here on only the call's rows ``keep`` (in that order) reach the layers: step
        caching runs the blocks after the first on the rows that compute. None: all again."""
        if keep is None:
            if self._full is not None:
                self._groups, self._rows = self._full
                self._full = None
            return
        if not self._groups and self._full is None:
            return
        if self._full is None:
            self._full = (self._groups, self._rows)
        position = {row: i for i, row in enumerate(keep)}
        narrowed = {}
        for name, group in self._full[0].items():
            pairs = [(position[row], scale) for row, scale in zip(group.index.tolist(), group.scales.tolist())
                     if row in position]
            if pairs:
                narrowed[name] = _Group(torch.tensor([p for p, _ in pairs], device=group.index.device),
                                        torch.tensor([s for _, s in pairs], device=group.scales.device,
                                                     dtype=group.scales.dtype))
        self._groups = narrowed
        self._rows = len(keep)

    def _hook(self, module: str):
        def add_deltas(layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not self._groups:
                return None
            x = args[0]
            if x.shape[0] != self._rows:
                raise RuntimeError(f"LoRA on {module}: input has {x.shape[0]} rows, the call has {self._rows}")
            for name, group in self._groups.items():
                factors = self.adapters[name].get(module)
                if factors is None:
                    continue
                rows = x.index_select(0, group.index)
                delta = (rows @ factors.down.T) @ factors.up.T
                scale = (group.scales * factors.scale).view(-1, *([1] * (delta.dim() - 1)))
                output = output.index_add(0, group.index, delta * scale)
            return output

        return add_deltas


def summarize(name: str, factors: dict[str, LoraFactors]) -> LoraSummary:
    ranks = {f.down.shape[0] for f in factors.values()}
    params = sum(f.down.numel() + f.up.numel() for f in factors.values())
    return LoraSummary(name, len(factors), max(ranks), params)


def row_loras(groups: Sequence[tuple[int, Sequence[LoraRef]]], guided: bool) -> list[Sequence[LoraRef]]:
    """Each transformer row's adapters from (rows, adapters) per request, in call order;
    under guidance the unconditional half repeats the conditional one."""
    rows = [refs for n, refs in groups for _ in range(n)]
    return rows + rows if guided else rows
