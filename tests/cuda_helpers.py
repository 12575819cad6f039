"""Helpers for the CUDA tests: real-width random pipelines, and the bf16 tolerance.

No hub is reachable where these run, so each family is the tiny preset with a transformer
of the real model's width (benchmarks/scaled_models.py), saved to a folder and loaded the
way a user's model is.

The bf16 tolerance is measured, not guessed. bf16 keeps 8 significant bits (unit
roundoff 2**-8 = 3.9e-3), and which rounding a step gets depends on the kernels, which
depend on the batch: an engine batch and the pipeline's batch of one are two bf16
computations of the same function, each off the exact result by about as much as bf16
itself moves it. So each test first measures that, the relative L2 distance between the
pipeline's bf16 and fp32 final latents (``floor``), and allows the engine 3x it against
the bf16 pipeline: 2x for two independent bf16 errors, 1.5x margin. A floor above 5 %
would mean the comparison says nothing, and fails by itself.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline

from engine.request import ImageParams

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Real width and heads, fewer layers (benchmarks/scaled_models.py): double-stream, single-stream.
SCALED_LAYERS = {"pixart": (2, 0), "sd3": (2, 0), "flux": (1, 2)}
FLOOR_LIMIT = 0.05
MIN_TOLERANCE = 2e-3

# Staggered requests at 512x512 (they share batches at different steps), few steps.
REQUESTS_512 = [
    ("a red fox", dict(seed=11, num_inference_steps=8, guidance_scale=4.0)),
    ("a blue cat in the city", dict(seed=12, num_inference_steps=6, guidance_scale=2.5, negative_prompt="blurry")),
    ("a tree by the river", dict(seed=13, num_inference_steps=7, guidance_scale=6.0, n=2)),
]


def load_pipeline(folder: str, dtype: torch.dtype, device: str = "cuda") -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=dtype).to(device)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_latents(pipe: DiffusionPipeline, prompt: str, params: ImageParams) -> torch.Tensor:
    kwargs = dict(num_inference_steps=params.num_inference_steps, guidance_scale=params.guidance_scale,
                  height=params.height, width=params.width, num_images_per_prompt=params.n)
    name = type(pipe).__name__
    if name.startswith("PixArt"):
        kwargs["use_resolution_binning"] = False
    if params.negative_prompt is not None and not name.startswith("Flux"):
        kwargs["negative_prompt"] = params.negative_prompt
    with torch.inference_mode():
        out = pipe(prompt, generator=torch.Generator().manual_seed(params.seed), output_type="latent", **kwargs)
    return out.images.float().cpu()


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.double().flatten(), reference.double().flatten()
    return float((value - reference).norm() / reference.norm())


def assert_within_bf16(outputs, requests, folder: str) -> None:
    """Each output's final latents against the bf16 pipeline, within 3x bf16's own effect."""
    pipe16, pipe32 = load_pipeline(folder, torch.bfloat16), load_pipeline(folder, torch.float32)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference is fp32 throughout
    try:
        report = []
        for (prompt, _), out in zip(requests, outputs):
            assert out.finished, out
            ref16 = pipeline_latents(pipe16, prompt, out.params)
            ref32 = pipeline_latents(pipe32, prompt, out.params)
            floor = relative_error(ref16, ref32)
            error = relative_error(torch.from_numpy(out.latents), ref16)
            report.append(f"{prompt!r}: engine vs bf16 pipeline {error:.2e}, bf16 vs fp32 pipeline {floor:.2e}")
            assert floor < FLOOR_LIMIT, "bf16 itself moves the result too far to compare: " + report[-1]
            assert error <= max(3 * floor, MIN_TOLERANCE), "; ".join(report)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
