"""The model families gfdit runs natively: one line per family, imported only when used.

Each line names the family's adapter class, the diffusers pipeline classes it serves, and
the function that installs its sequence-parallel attention processors (None: the family
runs at degree 1 only). Adding a family is one adapter module, one preset (optional, in
presets.py) and one line here; the scheduler and the engine loop know no family.
A diffusers pipeline no line names runs through the whole-pipeline fallback
(engine/models/fallback.py).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    adapter: str  # "module:Class", a DiTAdapter subclass
    pipelines: tuple[str, ...]  # diffusers pipeline class names it serves
    sequence_parallel: str | None = None  # "module:function(transformer, sp)"


FAMILIES: dict[str, Family] = {
    "pixart": Family("engine.models.pixart:PixArtAdapter", ("PixArtSigmaPipeline",),
                     "engine.distributed.ulysses:install_pixart"),
    "sd3": Family("engine.models.sd3:SD3Adapter", ("StableDiffusion3Pipeline",),
                  "engine.distributed.ulysses:install_sd3"),
    "flux": Family("engine.models.flux:FluxAdapter", ("FluxPipeline",),
                   "engine.distributed.ulysses:install_flux"),
    "qwen-image": Family("engine.models.qwen_image:QwenImageAdapter", ("QwenImagePipeline",),
                         "engine.distributed.ulysses_qwen:install_qwen_image"),
    "z-image": Family("engine.models.z_image:ZImageAdapter", ("ZImagePipeline",),
                      "engine.distributed.ulysses_qwen:install_z_image"),
}


def resolve(path: str) -> Any:
    """``"package.module:name"`` -> the object, importing the module now."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def family_of_pipeline(pipeline_class_names: list[str]) -> str | None:
    """The family serving the first of these class names (a pipeline's class, then its bases)."""
    for class_name in pipeline_class_names:
        for family, entry in FAMILIES.items():
            if class_name in entry.pipelines:
                return family
    return None


def native_pipelines() -> list[str]:
    return [name for entry in FAMILIES.values() for name in entry.pipelines]
