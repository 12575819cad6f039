"""Which device each worker rank runs on, and whether a GPU layout can form an NCCL world."""

from __future__ import annotations


def default_num_workers(device: str) -> int:
    """One worker per GPU; 1 on CPU."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 1


def rank_device(device: str, rank: int) -> str:
    """Worker ``rank``'s device: its own GPU when the engine's device is auto or cuda."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{rank % torch.cuda.device_count()}"
    return "cpu" if device == "auto" else device


def gpu_layout_error(devices: list[str], visible: str | None) -> str | None:
    """Why these per-rank devices cannot form an NCCL world, or None.

    NCCL refuses two ranks on one GPU ("Duplicate GPU detected"), and MIG instances
    cannot talk to each other through it, so several GPU workers need one whole GPU
    each; co-located ranks have no other path on GPU. ``visible`` is CUDA_VISIBLE_DEVICES.
    """
    gpus = [d for d in devices if d.startswith("cuda")]
    if len(gpus) < 2:
        return None
    if visible is not None and any(e.strip().startswith("MIG-") for e in visible.split(",")):
        return (f"{len(gpus)} workers on MIG instances: NCCL cannot connect MIG instances; "
                "run one worker per whole GPU, or --num-workers 1")
    shared = sorted({d for d in gpus if gpus.count(d) > 1})
    if shared:
        return (f"{len(gpus)} workers on {len(set(gpus))} GPU(s) ({', '.join(shared)} would hold several): "
                "NCCL needs one GPU per worker; use --num-workers <= the GPUs visible, one cuda device per worker")
    return None
