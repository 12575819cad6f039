"""Ulysses sequence parallelism as attention processors; the installers of PixArt, SD3 and FLUX.

Within a group of P workers, each member runs the transformer blocks on 1/P of the image
tokens. Attention needs every token, so each attention layer trades a sequence shard of
all heads for all tokens of 1/P of the heads (one all_to_all of q, k, v together),
attends, and trades back. Text tokens are few and stay whole on every member: their
projections are computed everywhere, each member attends with its own heads, and the
text output's heads are all-gathered. Everything outside the blocks (patch and timestep
embeddings, the output layer) runs on the full sequence on every member, so each member
ends a step with the full noise prediction and hence the full latents.

The group is the current task's and changes from step to step; with no group (degree 1)
the processors hand over to the model's own, so results are the pipeline's exactly.

A family's installer (``install_<family>(transformer, sp)``) puts processors on its
attention layers and calls ``install_hooks``; engine/models/registry.py names it, so a new
family's installer may live in its own module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections

from engine.distributed.group_free import Collectives, Group


class SequenceParallel:
    """One worker's sequence-parallel state: its collectives and the group of the running task."""

    def __init__(self, comm: Collectives | None, backend: str = "sdpa") -> None:
        self.comm = comm
        self.backend = backend
        self.group: Group = ()
        self.text_len = 0  # FLUX single blocks see [text; image] and must know where text ends

    @contextmanager
    def running(self, group: Group) -> Iterator[None]:
        if len(group) > 1 and self.comm is None:
            raise RuntimeError(f"group {group} needs collectives, but this worker has none")
        self.group = tuple(group)
        try:
            yield
        finally:
            self.group = ()

    @property
    def degree(self) -> int:
        return max(1, len(self.group))

    @property
    def active(self) -> bool:
        return self.degree > 1

    @property
    def index(self) -> int:
        return self.group.index(self.comm.rank) if self.active else 0  # type: ignore[union-attr]

    # ----- data movement -----------------------------------------------------------
    def shard_seq(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] % self.degree:
            raise ValueError(f"{x.shape[1]} image tokens do not split over degree {self.degree}")
        return x.chunk(self.degree, dim=1)[self.index].contiguous()

    def gather_seq(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.comm.all_gather(self.group, x.contiguous()), dim=1)  # type: ignore[union-attr]

    def gather_heads(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.comm.all_gather(self.group, x.contiguous()), dim=2)  # type: ignore[union-attr]

    def local_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.chunk(self.degree, dim=2)[self.index]

    def seq_to_heads(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        """(B, S/P, H, d) each -> (B, S, H/P, d) each, in one all_to_all."""
        stacked = torch.stack(xs)
        chunks = [c.contiguous() for c in stacked.chunk(self.degree, dim=3)]
        received = self.comm.all_to_all(self.group, chunks)  # type: ignore[union-attr]
        return list(torch.cat(received, dim=2).unbind(0))

    def heads_to_seq(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, H/P, d) -> (B, S/P, H, d)."""
        chunks = [c.contiguous() for c in x.chunk(self.degree, dim=1)]
        return torch.cat(self.comm.all_to_all(self.group, chunks), dim=2)  # type: ignore[union-attr]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention on (B, S, h, d) tensors, returning (B, S, h, d)."""
        if self.backend == "xformers":
            import xformers.ops as xops

            return xops.memory_efficient_attention(q, k, v)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    def owns(self) -> bool:
        """Whether our processors must run (several ranks, or a non-default kernel)."""
        return self.active or self.backend != "sdpa"


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1))


class _Processor:
    def __init__(self, sp: SequenceParallel, original: Any) -> None:
        self.sp = sp
        self.original = original


class SelfAttention(_Processor):
    """Self-attention over image tokens only (PixArt attn1, SD3.5's second attention)."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        sp = self.sp
        if not sp.owns():
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if attention_mask is not None or encoder_hidden_states is not None or attn.group_norm is not None:
            raise NotImplementedError("sequence-parallel self-attention takes no mask, context or group norm")
        q, k, v = (_heads(proj(hidden_states), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if sp.active:
            q, k, v = sp.seq_to_heads(q, k, v)
        out = sp.attention(q, k, v)
        if sp.active:
            out = sp.heads_to_seq(out)
        out = attn.to_out[1](attn.to_out[0](out.flatten(2).to(q.dtype)))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class JointAttention(_Processor):
    """SD3's joint attention: [image; text] tokens, image sharded, text whole on every member."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        sp = self.sp
        if not sp.owns() or encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        q, k, v = (_heads(proj(hidden_states), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        tq, tk, tv = (_heads(proj(encoder_hidden_states), attn.heads)
                      for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            tq, tk = attn.norm_added_q(tq), attn.norm_added_k(tk)
        if sp.active:
            q, k, v = sp.seq_to_heads(q, k, v)
            tq, tk, tv = sp.local_heads(tq), sp.local_heads(tk), sp.local_heads(tv)
        image_len = q.shape[1]
        out = sp.attention(torch.cat([q, tq], 1), torch.cat([k, tk], 1), torch.cat([v, tv], 1))
        image, text = out[:, :image_len], out[:, image_len:]
        if sp.active:
            image, text = sp.heads_to_seq(image), sp.gather_heads(text)
        image = attn.to_out[1](attn.to_out[0](image.flatten(2).to(q.dtype)))
        text = text.flatten(2).to(q.dtype)
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return image, text


class FluxAttention(_Processor):
    """FLUX attention: [text; image] tokens with rotary embeddings of the full sequence.

    Double-stream blocks pass text and image apart; single-stream blocks pass them joined,
    so the text length comes from the block hook (``SequenceParallel.text_len``).
    """

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None) -> Any:
        sp = self.sp
        if not sp.owns():
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:
            raise NotImplementedError("sequence-parallel FLUX attention takes no mask")
        q, k, v, tq, tk, tv = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            tq, tk, tv = (t.unflatten(-1, (-1, attn.head_dim)) for t in (tq, tk, tv))
            tq, tk = attn.norm_added_q(tq), attn.norm_added_k(tk)
        else:  # single-stream: split the joined sequence
            n = sp.text_len
            (tq, q), (tk, k), (tv, v) = ((t[:, :n], t[:, n:]) for t in (q, k, v))
        if sp.active:
            q, k, v = sp.seq_to_heads(q, k, v)
            tq, tk, tv = sp.local_heads(tq), sp.local_heads(tk), sp.local_heads(tv)
        text_len = tq.shape[1]
        q, k, v = torch.cat([tq, q], 1), torch.cat([tk, k], 1), torch.cat([tv, v], 1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = sp.attention(q, k, v).to(q.dtype)
        text, image = out[:, :text_len], out[:, text_len:]
        if sp.active:
            text, image = sp.gather_heads(text), sp.heads_to_seq(image)
        text, image = text.flatten(2), image.flatten(2)
        if encoder_hidden_states is None:
            return torch.cat([text, image], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text.contiguous())


def install(transformer: torch.nn.Module, family: str, sp: SequenceParallel) -> None:
    """Put the family's sequence-parallel processors and shard/gather hooks on a transformer
    (the family's installer comes from engine/models/registry.py)."""
    from engine.models.registry import FAMILIES, resolve

    entry = FAMILIES.get(family)
    if entry is None or entry.sequence_parallel is None:
        raise ValueError(f"no sequence-parallel support for family {family!r}")
    resolve(entry.sequence_parallel)(transformer, sp)


def install_pixart(transformer: torch.nn.Module, sp: SequenceParallel) -> None:
    blocks = list(transformer.transformer_blocks)
    for block in blocks:
        block.attn1.set_processor(SelfAttention(sp, block.attn1.processor))
    install_hooks(blocks, sp)


def install_sd3(transformer: torch.nn.Module, sp: SequenceParallel) -> None:
    blocks = list(transformer.transformer_blocks)
    for block in blocks:
        block.attn.set_processor(JointAttention(sp, block.attn.processor))
        if getattr(block, "attn2", None) is not None:
            block.attn2.set_processor(SelfAttention(sp, block.attn2.processor))
    install_hooks(blocks, sp)


def install_flux(transformer: torch.nn.Module, sp: SequenceParallel) -> None:
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    for block in blocks:
        block.attn.set_processor(FluxAttention(sp, block.attn.processor))
    install_hooks(blocks, sp)


def install_hooks(blocks: list[torch.nn.Module], sp: SequenceParallel) -> None:
    """Shard the image tokens before the first block and gather them after the last."""
    blocks[0].register_forward_pre_hook(_shard_hook(sp), with_kwargs=True)
    blocks[-1].register_forward_hook(_gather_hook(sp))


def _shard_hook(sp: SequenceParallel):
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not sp.active:
            return None
        context = kwargs.get("encoder_hidden_states")
        sp.text_len = context.shape[1] if context is not None else 0
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = sp.shard_seq(kwargs["hidden_states"])
        else:
            args = (sp.shard_seq(args[0]), *args[1:])
        return args, kwargs

    return hook


def _gather_hook(sp: SequenceParallel):
    def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
        if not sp.active:
            return None
        if isinstance(output, tuple):  # (text, image) from joint blocks
            return (output[0], sp.gather_seq(output[1]))
        return sp.gather_seq(output)

    return hook
