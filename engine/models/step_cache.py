"""Per-request first-block step caching inside one batched transformer call.

Consecutive denoise steps change a DiT's hidden states little in the middle of sampling,
and how much the *first* block's residual (its output minus its input) changed since the
last fully computed step predicts how much the whole stack's would (First-Block Cache,
TeaCache). So at every step every row runs the first block; a request whose relative L1
change ``sum|r - r_prev| / sum|r_prev|`` is under its threshold reuses the residual the
remaining blocks produced at its last computed step, and only the other rows run the
remaining blocks, as a smaller batch, so the saved work is real.

- One decision per request: its rows (the unconditional and conditional rows under CFG,
  every image of ``n``) are summed together, so its guidance combines predictions of the
  same kind.
- A request's cache lives in its ``RequestState.cache`` (``first``: the first block's
  residual at its last computed step, ``rest``: the remaining blocks' residual then,
  ``run``: cached steps in a row, ``cached``: cached steps so far), full along the
  sequence, so it migrates with the state and a step at another degree can use it.
- Under sequence parallelism each member holds a shard of the image tokens: it sums its
  shard's part of each request's two norms, the group all-gathers those few numbers (the
  group-free collectives) and every member adds them in the same order, so all members
  take the same decision. Residuals of computed rows are gathered along the sequence
  before they are stored.

Why not diffusers' ``FirstBlockCache`` hooks (``diffusers.hooks``): they keep one state for
the whole pipeline call and decide for the whole batch at once, so rows of different
requests, at different steps with different thresholds, could not decide apart, and the
state cannot move between workers. The mechanism here wraps the same blocks the same way
(the first block, the remaining blocks, the last block) with per-row state.

The wrappers replace each block's ``forward`` when the first cached call comes (after
regional compile, whose dispatcher they then wrap); module hooks (the sequence-parallel
shard before the first block, the gather after the last) stay around them. The decision
rule (first and last steps computed, the bound on cached steps in a row) belongs to the
adapter (``DiTAdapter._cache_entries``); this module only measures and reuses.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# How the call's later blocks run: every row, only the rows that compute, or none.
ALL, SUBSET, NONE = "all", "subset", "none"


@dataclass
class CacheEntry:
    """One request in a call: its cache, its rows in the call, and whether it may reuse."""

    cache: dict[str, Any]
    rows: list[int]
    threshold: float
    candidate: bool
    cached: bool = False


@dataclass
class _Call:
    entries: list[CacheEntry]
    total_rows: int
    mode: str = ALL
    keep: torch.Tensor | None = None  # rows that run the remaining blocks (SUBSET)
    first_out: torch.Tensor | None = None
    first_residual: torch.Tensor | None = None
    narrowed: dict[int, torch.Tensor] = field(default_factory=dict)


class StepCache:
    """The first-block cache of one transformer: ``blocks`` in the order its forward runs
    them; ``tuple_output``: blocks return ``(encoder_hidden_states, hidden_states)``."""

    def __init__(self, blocks: Sequence[nn.Module], tuple_output: bool,
                 narrow_rows: Callable[[list[int] | None], None] | None = None) -> None:
        if len(blocks) < 2:
            raise ValueError("step caching needs at least two transformer blocks")
        self.blocks = list(blocks)
        self.tuple_output = tuple_output
        # Told the rows that go on after the first block (None: all again), e.g. LoRA.
        self.narrow_rows = narrow_rows
        self.sp: Any = None  # the worker's SequenceParallel, set by the worker
        self._call: _Call | None = None
        self._installed = False

    @contextlib.contextmanager
    def call(self, entries: list[CacheEntry], total_rows: int) -> Iterator[None]:
        """Cache the transformer call made inside; ``entries``: the requests with a cache."""
        if not entries:
            yield
            return
        if not self._installed:
            self._install()
        self._call = _Call(entries, total_rows)
        try:
            yield
        finally:
            self._call = None
            if self.narrow_rows is not None:
                self.narrow_rows(None)

    # ----- wrappers ------------------------------------------------------------------
    def _install(self) -> None:
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            inner = block.forward
            wrapper = self._head(inner) if i == 0 else self._rest(inner, i == last)
            block.forward = functools.wraps(inner)(wrapper)
        self._installed = True

    def _head(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            out = inner(*args, **kwargs)
            call = self._call
            if call is None:
                return out
            hidden_in = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            hidden_out = out[1] if self.tuple_output else out
            call.first_out = hidden_out
            call.first_residual = hidden_out - hidden_in
            self._decide(call)
            if call.mode != SUBSET:
                return out
            keep = call.keep
            if self.narrow_rows is not None:
                self.narrow_rows(keep.tolist())  # type: ignore[union-attr]
            if self.tuple_output:
                context = out[0]
                return (None if context is None else context.index_select(0, keep), hidden_out.index_select(0, keep))
            return hidden_out.index_select(0, keep)

        return forward

    def _rest(self, inner: Callable[..., Any], last: bool) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            call = self._call
            if call is None:
                return inner(*args, **kwargs)
            if call.mode == ALL:
                out = inner(*args, **kwargs)
            elif call.mode == NONE:
                hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                out = (kwargs.get("encoder_hidden_states"), hidden) if self.tuple_output else hidden
            else:
                out = inner(*[self._narrow(call, a) for a in args],
                            **{k: self._narrow(call, v) for k, v in kwargs.items()})
            return self._finish(call, out) if last else out

        return forward

    @staticmethod
    def _narrow(call: _Call, value: Any) -> Any:
        """Per-row arguments (time embeddings, text states and masks: every top-level
        tensor whose batch is the call's) cut to the rows that compute; the hidden states
        already are. Rotary tables come as tuples and pass whole."""
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != call.total_rows:
            return value
        cut = call.narrowed.get(id(value))
        if cut is None:
            cut = call.narrowed[id(value)] = value.index_select(0, call.keep)  # type: ignore[arg-type]
        return cut

    # ----- decide --------------------------------------------------------------------
    def _decide(self, call: _Call) -> None:
        residual = call.first_residual
        assert residual is not None
        candidates = [e for e in call.entries if e.candidate]
        if candidates:
            # All candidates' rows in one pass, summed per request by index_add (in
            # float32: bf16 sums over a whole image lose the small differences).
            rows = [row for e in candidates for row in e.rows]
            owner = torch.tensor([k for k, e in enumerate(candidates) for _ in e.rows], device=residual.device)
            current = residual[rows].float().flatten(1)
            previous = torch.cat([self._local(e.cache["first"]) for e in candidates]).float().flatten(1)
            per_row = torch.stack([(current - previous).abs().sum(1), previous.abs().sum(1)], dim=1)
            partial = torch.zeros(len(candidates), 2, device=residual.device).index_add_(0, owner, per_row)
            sp = self.sp
            if sp is not None and sp.active:
                # Every member adds the same parts in group order: the same decisions.
                total = torch.zeros_like(partial)
                for part in sp.comm.all_gather(sp.group, partial.contiguous()):
                    total = total + part
                partial = total
            for e, (change, size) in zip(candidates, partial.tolist()):
                e.cached = change < e.threshold * size
        computed = sorted(row for e in call.entries if not e.cached for row in e.rows)
        cached_rows = sum(len(e.rows) for e in call.entries if e.cached)
        if not cached_rows:
            call.mode = ALL
            return
        # Rows of requests without a cache are not in entries: they always compute.
        in_entries = {row for e in call.entries for row in e.rows}
        computed = sorted(set(computed) | (set(range(call.total_rows)) - in_entries))
        if not computed:
            call.mode = NONE
            return
        call.mode = SUBSET
        call.keep = torch.tensor(computed, device=residual.device)

    # ----- finish --------------------------------------------------------------------
    def _finish(self, call: _Call, out: Any) -> Any:
        """Put the cached rows' reused residual beside the computed rows, and store what the
        computed rows of cached requests produced, for their next steps."""
        hidden = out[1] if self.tuple_output else out
        first = call.first_out
        assert first is not None
        if call.mode == ALL:
            final = hidden
        else:
            cached = [e for e in call.entries if e.cached]
            index = torch.tensor([row for e in cached for row in e.rows], device=first.device)
            rest = torch.cat([self._local(e.cache["rest"]) for e in cached]).to(first.dtype)
            final = first.index_add(0, index, rest)  # each cached row: its first-block output + its rest
            if call.mode == SUBSET:
                final = final.index_copy(0, call.keep, hidden)  # type: ignore[arg-type]
                if self.narrow_rows is not None:
                    self.narrow_rows(None)  # the output layers see every row again
        self._store(call, final)
        return (out[0], final) if self.tuple_output else final

    def _store(self, call: _Call, final: torch.Tensor) -> None:
        first, residual = call.first_out, call.first_residual
        computed = [e for e in call.entries if not e.cached]
        for e in call.entries:
            if e.cached:
                e.cache["run"] = e.cache.get("run", 0) + 1
                e.cache["cached"] = e.cache.get("cached", 0) + 1
        if not computed:
            return
        rows = [row for e in computed for row in e.rows]
        stacked = torch.stack([residual[rows], final[rows] - first[rows]])  # type: ignore[index]
        stacked = self._gather(stacked)
        start = 0
        for e in computed:
            part = stacked[:, start:start + len(e.rows)]
            start += len(e.rows)
            e.cache["first"], e.cache["rest"] = part[0].clone(), part[1].clone()
            e.cache["run"] = 0

    # ----- sequence shards -----------------------------------------------------------
    def _local(self, full: torch.Tensor) -> torch.Tensor:
        """This member's shard of a stored (full-sequence) residual."""
        sp = self.sp
        return sp.shard_seq(full) if sp is not None and sp.active else full

    def _gather(self, stacked: torch.Tensor) -> torch.Tensor:
        """(2, rows, S/P, D) shards -> (2, rows, S, D) on every member."""
        sp = self.sp
        if sp is None or not sp.active:
            return stacked
        return torch.cat(sp.comm.all_gather(sp.group, stacked.contiguous()), dim=2)
