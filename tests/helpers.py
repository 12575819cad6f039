"""Helpers for the tests: the plain diffusers pipeline is the reference for every image."""

from __future__ import annotations

import asyncio

import numpy as np
import torch

from engine.request import ImageParams

FAMILY_PRESETS = ["tiny-pixart", "tiny-sd3", "tiny-flux", "tiny-qwen-image", "tiny-z-image"]


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
    if name.startswith(("PixArt", "Sana")):
        kwargs["use_resolution_binning"] = False
    if params.negative_prompt is not None and not name.startswith("Flux"):
        kwargs["negative_prompt"] = params.negative_prompt
    if name.startswith("QwenImage"):
        kwargs["true_cfg_scale"] = params.true_cfg_scale
        if not pipe.transformer.config.guidance_embeds:  # the pipeline ignores it, with a warning
            kwargs["guidance_scale"] = None
    if name.startswith("ZImage"):
        kwargs["cfg_normalization"] = params.cfg_normalization or False
        kwargs["cfg_truncation"] = 1.0 if params.cfg_truncation is None else params.cfg_truncation
    latents = pipe(prompt, generator=torch.Generator().manual_seed(params.seed), output_type="latent",
                   **kwargs).images
    images = pipe(prompt, generator=torch.Generator().manual_seed(params.seed), output_type="pil", **kwargs).images
    return latents, np.stack([np.asarray(image) for image in images])


def assert_matches_pipeline(pipe, prompt: str, out) -> None:
    """A finished output has the plain pipeline's latents (<= 1e-4) and pixels (<= 1)."""
    assert out.finished and len(out.images) == out.params.n
    ref_latents, ref_pixels = pipeline_reference(pipe, prompt, out.params)
    assert np.abs(out.latents - ref_latents.numpy()).max() <= 1e-4
    pixels = np.stack([image.to_numpy() for image in out.images])
    assert np.abs(pixels.astype(int) - ref_pixels.astype(int)).max() <= 1


STAGGERED = [
    ("a red fox", dict(seed=11, num_inference_steps=8, guidance_scale=4.0)),
    ("a blue cat in the city", dict(seed=12, num_inference_steps=6, guidance_scale=2.5, negative_prompt="blurry")),
    ("a tree by the river", dict(seed=13, num_inference_steps=7, guidance_scale=6.0, n=2)),
    ("snow on a mountain", dict(seed=14, num_inference_steps=5, guidance_scale=3.0)),
]


def record_tasks(engine):
    """Wrap submit to see, for each task, the step each of its requests was at."""
    seen = []
    submit = engine.executor.submit

    def recording(task):
        steps = [engine.scheduler.requests[rid].step for rid in task.request_ids]
        seen.append((task, steps))
        submit(task)

    engine.executor.submit = recording
    return seen


async def run_staggered(engine, requests, width=64, height=64):
    """Start request i once request i-1 has made two steps, so batches mix steps."""
    outputs = [None] * len(requests)
    started = [asyncio.Event() for _ in requests]

    async def one(i):
        prompt, kw = requests[i]
        if i:
            await started[i - 1].wait()
        params = ImageParams(width=width, height=height, output_format="raw", return_latents=True, **kw)
        async for out in engine.generate(prompt, params):
            if out.step >= 2:
                started[i].set()
            outputs[i] = out
        started[i].set()

    await asyncio.gather(*(one(i) for i in range(len(requests))))
    return outputs
