"""Ulysses sequence parallelism for Qwen-Image and Z-Image (see ulysses.py for the scheme).

Qwen-Image's blocks are double-stream: image and text tokens keep their own weights and
meet in one joint attention over ``[text; image]``, with a rotary embedding per stream and
a mask over the text padding. Image tokens are sharded, text stays whole on every member.
The rotary tables and the mask arrive whole (the hooks shard only the hidden states), so
they are applied after the all_to_all, when each member holds every token of its heads.

Z-Image is single-stream: a noise refiner runs over the image tokens, a context refiner
over the caption, then every main layer over one sequence ``[image; caption]`` per sample,
each padded to a multiple of 32 and the batch padded to its longest with a mask. The noise
refiner and the main layers are sharded along that sequence (a multiple of 32, so any
power-of-two degree up to 32 divides it); the short context refiner runs whole.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

from engine.distributed.ulysses import SequenceParallel, _gather_hook, _Processor, _shard_hook


def _attention(sp: SequenceParallel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
    """Attention on (B, S, h, d); a boolean ``mask`` (B, 1, 1, S) hides padded keys."""
    if mask is None:
        return sp.attention(q, k, v)
    # A masked call runs SDPA whatever the backend: the diffusers processors do the same.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


class QwenImageAttention(_Processor):
    """Qwen-Image's joint attention, ``[text; image]``, image tokens sharded."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 encoder_hidden_states_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: Any = None) -> Any:
        sp = self.sp
        if not sp.owns() or encoder_hidden_states is None or attention_mask is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                 attention_mask, image_rotary_emb)
        head_dim = attn.inner_dim // attn.heads
        q, k, v = (proj(hidden_states).unflatten(-1, (-1, head_dim)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        tq, tk, tv = (proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
                      for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if attn.norm_added_q is not None:
            tq = attn.norm_added_q(tq)
        if attn.norm_added_k is not None:
            tk = attn.norm_added_k(tk)
        if sp.active:
            q, k, v = sp.seq_to_heads(q, k, v)
            tq, tk, tv = sp.local_heads(tq), sp.local_heads(tk), sp.local_heads(tv)
        if image_rotary_emb is not None:
            image_freqs, text_freqs = image_rotary_emb
            q, k = (apply_rotary_emb_qwen(x, image_freqs, use_real=False) for x in (q, k))
            tq, tk = (apply_rotary_emb_qwen(x, text_freqs, use_real=False) for x in (tq, tk))
        mask = None
        if encoder_hidden_states_mask is not None:
            image_mask = torch.ones(q.shape[:2], dtype=torch.bool, device=q.device)
            mask = torch.cat([encoder_hidden_states_mask.bool(), image_mask], dim=1)[:, None, None, :]
        text_len = tq.shape[1]
        out = _attention(sp, torch.cat([tq, q], 1), torch.cat([tk, k], 1), torch.cat([tv, v], 1), mask).to(q.dtype)
        text, image = out[:, :text_len], out[:, text_len:]
        if sp.active:
            text, image = sp.gather_heads(text), sp.heads_to_seq(image)
        image = attn.to_out[0](image.flatten(2).contiguous())
        if len(attn.to_out) > 1:
            image = attn.to_out[1](image)
        return image, attn.to_add_out(text.flatten(2).contiguous())


def _rotate(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Z-Image's rotary embedding: (B, S, h, d) by complex (B, S, d/2), as its processor does."""
    rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs_cis.unsqueeze(2)
    return torch.view_as_real(rotated).flatten(3).type_as(x)


class ZImageAttention(_Processor):
    """Z-Image's single-stream self-attention over a sharded sequence."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, freqs_cis: torch.Tensor | None = None) -> torch.Tensor:
        sp = self.sp
        if not sp.owns():
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)
        q, k, v = (proj(hidden_states).unflatten(-1, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if sp.active:
            q, k, v = sp.seq_to_heads(q, k, v)
        if freqs_cis is not None:
            q, k = _rotate(q, freqs_cis), _rotate(k, freqs_cis)
        mask = attention_mask
        if mask is not None and mask.ndim == 2:
            mask = mask[:, None, None, :]
        out = _attention(sp, q, k, v, mask).to(q.dtype)
        if sp.active:
            out = sp.heads_to_seq(out)
        out = attn.to_out[0](out.flatten(2))
        if len(attn.to_out) > 1:
            out = attn.to_out[1](out)
        return out


def _shard_blocks(blocks: list[torch.nn.Module], sp: SequenceParallel) -> None:
    """Shard the sequence before the first of these blocks and gather it after the last."""
    blocks[0].register_forward_pre_hook(_shard_hook(sp), with_kwargs=True)
    blocks[-1].register_forward_hook(_gather_hook(sp))


def install_qwen_image(transformer: torch.nn.Module, sp: SequenceParallel) -> None:
    blocks = list(transformer.transformer_blocks)
    for block in blocks:
        block.attn.set_processor(QwenImageAttention(sp, block.attn.processor))
    _shard_blocks(blocks, sp)


def install_z_image(transformer: torch.nn.Module, sp: SequenceParallel) -> None:
    for segment in (list(transformer.noise_refiner), list(transformer.layers)):
        for block in segment:
            block.attention.set_processor(ZImageAttention(sp, block.attention.processor))
        _shard_blocks(segment, sp)
