"""Choosing the attention kernel: SDPA everywhere, xformers where CUDA and a working build exist."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "xformers")


class AttentionBackendError(RuntimeError):
    pass


def xformers_problem(device: torch.device) -> str | None:
    """Why xformers cannot run here, or None if a tiny attention call on ``device`` works."""
    if device.type != "cuda":
        return "xformers kernels need a CUDA device"
    try:
        import xformers.ops as xops
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable"
        return f"xformers does not import: {exc}"
    try:
        q = torch.zeros(1, 8, 1, 64, device=device, dtype=torch.float16)
        xops.memory_efficient_attention(q, q, q)
    except Exception as exc:  # noqa: BLE001 - a build for another torch/CUDA fails here
        return f"xformers does not run with this torch/CUDA build: {exc}"
    return None


def resolve_attention_backend(requested: str, device: torch.device) -> str:
    """``auto`` picks xformers on a GPU where it works, else SDPA; asking for xformers where
    it cannot run is an error naming the reason, found at start-up rather than mid-request."""
    if requested not in BACKENDS:
        raise AttentionBackendError(f"unknown attention backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    if requested == "sdpa":
        return "sdpa"
    problem = xformers_problem(device)
    if requested == "xformers":
        if problem:
            raise AttentionBackendError(f"--attention-backend xformers is not available: {problem}")
        return "xformers"
    if problem:
        logger.info("attention backend: sdpa (%s)", problem)
        return "sdpa"
    return "xformers"
