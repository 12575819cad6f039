"""Regional ``torch.compile``: the transformer's repeated blocks, not the whole model.

A DiT is one block class repeated 12-57 times. Compiling each block's ``forward`` costs
one trace for all of them (the blocks of a class share code, and their weights are graph
inputs, so one graph serves every instance), where compiling the whole transformer traces
every block in a row and recompiles all of it for any change outside the blocks.

Shapes. A denoise batch changes size from step to step as requests join and leave it
(CFG doubles its rows). Dim 0 of every tensor argument, the batch, is marked dynamic
before each call, so the first compile already serves every batch of 2 rows or more;
a batch of 1 gets a graph of its own (PyTorch specialises sizes 0 and 1). A new image size
changes the sequence length, which ``torch.compile``'s automatic dynamic shapes make
symbolic at its second value. Arguments are made contiguous first: some models hand
their first block a transposed view and the rest contiguous tensors, which would
otherwise cost a graph per layout. Every graph compiled is logged and counted in
``CompileStats``.

Steps at sequence-parallel degree > 1 run the blocks eagerly (``eager_when``): their
attention calls the group-free collectives (shared memory, NCCL point-to-point), which
``torch.compile`` cannot trace, and the group changes from step to step.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass
class CompileStats:
    """What compiling has cost so far: graphs compiled (first compiles and recompiles)."""

    graphs: int = 0
    backend_seconds: float = 0.0
    """Time inside the compiler backend (inductor's code generation); tracing not included."""
    by_block: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, block: str, seconds: float) -> int:
        with self._lock:
            self.graphs += 1
            self.backend_seconds += seconds
            self.by_block[block] = self.by_block.get(block, 0) + 1
            return self.graphs


def repeated_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks to compile: those named by diffusers' ``_repeated_blocks`` where the model
    declares it, else every entry of the transformer's own ``nn.ModuleList``s (the block
    stacks of PixArt and SD3, which declare nothing)."""
    names = getattr(transformer, "_repeated_blocks", None)
    if names:
        blocks = [m for m in transformer.modules() if type(m).__name__ in names]
    else:
        blocks = [m for child in transformer.children() if isinstance(child, torch.nn.ModuleList)
                  for m in child]
    if not blocks:
        raise ValueError(f"{type(transformer).__name__} has no repeated blocks to compile")
    return blocks


def compile_repeated_blocks(transformer: torch.nn.Module, *, backend: str = "inductor",
                            eager_when: Callable[[], bool] = lambda: False,
                            stats: CompileStats | None = None) -> CompileStats:
    """Compile the repeated blocks of ``transformer`` in place; returns the live counters.

    ``eager_when()`` is asked before every block call: True runs the block uncompiled.
    Hooks on the blocks (the sequence-parallel shard and gather) stay outside the compiled
    region: only ``forward`` is replaced.
    """
    stats = stats if stats is not None else CompileStats()
    compiled_by_class: dict[type, Callable[..., Any]] = {}
    blocks = repeated_blocks(transformer)
    for block in blocks:
        cls = type(block)
        if cls not in compiled_by_class:
            compiled_by_class[cls] = torch.compile(
                cls.forward, backend=_counting_backend(backend, cls.__name__, stats))
        block.forward = _dispatching_forward(block, compiled_by_class[cls], eager_when)
    logger.info("compiling %d blocks (%s) with %s on first use",
                len(blocks), ", ".join(sorted(c.__name__ for c in compiled_by_class)), backend)
    return stats


def _dispatching_forward(block: torch.nn.Module, compiled: Callable[..., Any],
                         eager_when: Callable[[], bool]) -> Callable[..., Any]:
    eager = block.forward

    @functools.wraps(eager)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if eager_when():
            return eager(*args, **kwargs)
        return compiled(block, *map(_prepared, args), **{k: _prepared(v) for k, v in kwargs.items()})

    return forward


def _prepared(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        value = value.contiguous()
        if value.shape[0] > 1:
            torch._dynamo.maybe_mark_dynamic(value, 0)
    return value


def _counting_backend(backend: str, block: str, stats: CompileStats) -> Callable[..., Any]:
    inner = torch._dynamo.lookup_backend(backend)

    def compile_graph(graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        start = time.perf_counter()
        compiled = inner(graph, example_inputs)
        seconds = time.perf_counter() - start
        number = stats.record(block, seconds)
        logger.info("compiled %s graph %d (%s inputs %s) in %.1f s", block, number, backend,
                    _shape_summary(graph), seconds)
        return compiled

    return compile_graph


def _shape_summary(graph: torch.fx.GraphModule) -> str:
    """The activation shapes a graph was compiled for; dynamic sizes print as s0, s1, ..."""
    shapes = []
    for node in graph.graph.nodes:
        value = node.meta.get("example_value") if node.op == "placeholder" else None
        if (isinstance(value, torch.Tensor) and value.dim() >= 2
                and "_parameters_" not in node.name and "_buffers_" not in node.name):
            shapes.append(f"({', '.join(str(d) for d in value.shape)})")
    return ", ".join(shapes[:3]) or "no tensors"
