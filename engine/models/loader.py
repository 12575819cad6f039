"""Turn a model argument (preset name, local diffusers folder, or hub id) into an adapter."""

from __future__ import annotations

import logging
import os

import torch
from diffusers import DiffusionPipeline

from engine.models.base import DiTAdapter, ModelRunner
from engine.models.fallback import PipelineFallback
from engine.models.presets import PRESETS, build_preset
from engine.models.registry import FAMILIES, family_of_pipeline, native_pipelines, resolve

logger = logging.getLogger(__name__)


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


BACKENDS = ("auto", "diffusers")


def adapter_for(pipe: DiffusionPipeline, backend: str = "auto") -> type[DiTAdapter] | type[PipelineFallback]:
    """The adapter of the family serving the pipeline's class (or a base class of it); any
    other diffusers pipeline (or every one, with backend="diffusers") runs whole."""
    if backend not in BACKENDS:
        raise ModelLoadError(f"unknown backend {backend!r}; choose {' or '.join(BACKENDS)}")
    family = family_of_pipeline([cls.__name__ for cls in type(pipe).__mro__])
    if family is not None and backend == "auto":
        return resolve(FAMILIES[family].adapter)
    if isinstance(pipe, DiffusionPipeline):
        return PipelineFallback
    raise ModelLoadError(f"pipeline class {type(pipe).__name__} is not supported; "
                         f"supported: {', '.join(native_pipelines())}")


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


def load_adapter(model: str, device: str = "auto", dtype: str = "auto", backend: str = "auto") -> ModelRunner:
    """Load a pipeline on the device in the dtype, every module in eval mode."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    pipe = load_pipeline(model, torch_dtype)
    adapter_cls = adapter_for(pipe, backend)
    pipe.to(torch_device)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    preset = PRESETS.get(model)
    try:
        adapter = adapter_cls(pipe, model, default_size=preset.default_size if preset else None,
                              default_steps=preset.default_steps if preset else None)
    except ValueError as exc:
        raise ModelLoadError(f"model {model!r}: {exc}") from exc
    logger.info("loaded %s (%s) on %s in %s", model, adapter.family, torch_device, torch_dtype)
    return adapter
