"""Turn a model argument (preset name, local diffusers folder, or hub id) into an adapter."""

from __future__ import annotations

import logging
import os

import torch
from diffusers import DiffusionPipeline

from engine.models.base import DiTAdapter
from engine.models.flux import FluxAdapter
from engine.models.pixart import PixArtAdapter
from engine.models.presets import PRESETS, build_preset
from engine.models.sd3 import SD3Adapter

logger = logging.getLogger(__name__)

ADAPTERS: tuple[type[DiTAdapter], ...] = (PixArtAdapter, SD3Adapter, FluxAdapter)


class ModelLoadError(RuntimeError):
    pass


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was asked for but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """bf16 on GPU and fp32 on CPU unless told otherwise."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose auto, float32, bfloat16 or float16") from None


def adapter_for(pipe: DiffusionPipeline) -> type[DiTAdapter]:
    for adapter in ADAPTERS:
        if isinstance(pipe, adapter.pipeline_class):
            return adapter
    supported = ", ".join(a.pipeline_class.__name__ for a in ADAPTERS)
    raise ModelLoadError(f"pipeline class {type(pipe).__name__} is not supported; supported: {supported}")


def load_pipeline(model: str, dtype: torch.dtype) -> DiffusionPipeline:
    if model in PRESETS:
        pipe = build_preset(model)
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
    try:
        pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - every loader failure becomes one clear message
        where = "folder" if os.path.isdir(model) else "hub id (or folder)"
        raise ModelLoadError(
            f"could not load model {model!r} as a diffusers {where}: {exc}. "
            f"Built-in presets: {', '.join(sorted(PRESETS))}") from exc
    return pipe


def place_vae(pipe: DiffusionPipeline, dtype: torch.dtype) -> None:
    """Keep a VAE that overflows in float16 in float32 (its config says ``force_upcast``,
    as the SDXL VAE that PixArt-Sigma ships does), as diffusers' SDXL pipelines decode;
    the adapters cast latents to the VAE's dtype. Kept there for good rather than moved
    per decode: the VAE is small beside the transformer."""
    vae = getattr(pipe, "vae", None)
    if dtype != torch.float16 or vae is None:
        return
    if getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)
        logger.info("the VAE decodes in float32 (its config sets force_upcast)")
    if type(pipe).__name__.startswith("Flux"):
        logger.warning("FLUX overflows in float16 (black or NaN images); use --dtype bfloat16")


def load_adapter(model: str, device: str = "auto", dtype: str = "auto") -> DiTAdapter:
    """Load a pipeline on the device in the dtype, every module in eval mode."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    pipe = load_pipeline(model, torch_dtype)
    adapter_cls = adapter_for(pipe)
    pipe.to(torch_device)
    place_vae(pipe, torch_dtype)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    preset = PRESETS.get(model)
    adapter = adapter_cls(pipe, model, default_size=preset.default_size if preset else None,
                          default_steps=preset.default_steps if preset else None)
    logger.info("loaded %s (%s) on %s in %s", model, adapter.family, torch_device, torch_dtype)
    return adapter
