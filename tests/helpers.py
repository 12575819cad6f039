"""Helpers for the tests: the plain diffusers pipeline is the reference for every image."""

from __future__ import annotations

import numpy as np
import torch

from engine.request import ImageParams

FAMILY_PRESETS = ["tiny-pixart", "tiny-sd3", "tiny-flux"]


def pipeline_reference(pipe, prompt: str, params: ImageParams) -> tuple[torch.Tensor, np.ndarray]:
    """Final latents and uint8 pixels from the plain pipeline, one request at a time."""
    kwargs = dict(
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
        height=params.height,
        width=params.width,
        num_images_per_prompt=params.n,
    )
    name = type(pipe).__name__
    if name.startswith("PixArt"):
        kwargs["use_resolution_binning"] = False
    if params.negative_prompt is not None and not name.startswith("Flux"):
        kwargs["negative_prompt"] = params.negative_prompt
    latents = pipe(prompt, generator=torch.Generator().manual_seed(params.seed), output_type="latent",
                   **kwargs).images
    images = pipe(prompt, generator=torch.Generator().manual_seed(params.seed), output_type="pil", **kwargs).images
    return latents, np.stack([np.asarray(image) for image in images])
