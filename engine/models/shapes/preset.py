"""The ``shapes`` preset: the trained shapes model shipped inside the package.

``weights/`` is a plain diffusers folder (``PixArtSigmaPipeline``, fp16 safetensors), so
``DiffusionPipeline.from_pretrained(SHAPES_FOLDER)`` works without gfdit. It draws a flat
shape on a plain background at 64 px from captions like "a red circle on a blue background".
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline

SHAPES_FOLDER = Path(__file__).resolve().parent / "weights"
SHAPES_SIZE = 64
SHAPES_STEPS = 20
SHAPES_DESCRIPTION = "PixArt-Sigma trained on captioned shapes, 64 px (shipped weights)"


def build_shapes() -> DiffusionPipeline:
    """Load the shipped folder in fp32 (the weights are stored in fp16)."""
    if not (SHAPES_FOLDER / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the shapes model's weights are missing from {SHAPES_FOLDER}; reinstall gfdit, "
            "or train them with: python -m engine.models.shapes.train --out DIR")
    pipe = DiffusionPipeline.from_pretrained(SHAPES_FOLDER, dtype=torch.float32)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe
