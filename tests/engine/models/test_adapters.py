"""Schedule invariance at the adapter level: batching requests at different steps changes no image."""

import numpy as np
import pytest

from engine.models.loader import load_adapter
from engine.request import ImageParams, Limits
from tests.helpers import FAMILY_PRESETS, pipeline_reference

REQUESTS = [
    ("a red fox", dict(seed=1, num_inference_steps=6, guidance_scale=4.0)),
    ("a blue cat in the city at night", dict(seed=2, num_inference_steps=4, guidance_scale=2.0,
                                             negative_prompt="blurry")),
    ("tree", dict(seed=3, num_inference_steps=5, guidance_scale=7.0, n=2)),
    ("sky over the sea", dict(seed=4, num_inference_steps=3, guidance_scale=3.0)),
]


@pytest.mark.parametrize("preset", [*FAMILY_PRESETS, "shapes"])
def test_staggered_batches_match_the_pipeline(preset, preset_pipelines):
    adapter = load_adapter(preset, device="cpu")
    info = adapter.info()
    params = [ImageParams(width=64, height=64, **kw).resolve(info, Limits()) for _, kw in REQUESTS]
    prompts = [p for p, _ in REQUESTS]
    embeds = adapter.encode(prompts, params)
    states = [adapter.prepare(str(i), p, *embeds[i]) for i, p in enumerate(params)]
    keys = [info.batch_key(p) for p in params]
    # Request i joins at tick i, so every batch mixes requests at different steps; only
    # requests with equal batch keys share a call (Qwen-Image: with and without true CFG).
    tick = 0
    while any(not s.done for s in states):
        running = [i for i in range(min(tick + 1, len(states))) if not states[i].done]
        for key in dict.fromkeys(keys[i] for i in running):
            adapter.denoise([states[i] for i in running if keys[i] == key])
        tick += 1
    images = adapter.decode(states)
    pipe = preset_pipelines(preset)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        ref_latents, ref_pixels = pipeline_reference(pipe, prompt, p)
        assert (states[i].latents - ref_latents).abs().max().item() <= 1e-4, f"request {i}"
        assert images[i].shape == (p.n, 64, 64, 3)
        assert np.abs(images[i].astype(int) - ref_pixels.astype(int)).max() <= 1, f"request {i}"


def test_guidance_changes_the_image_and_cfg_off_batches_without_uncond():
    adapter = load_adapter("tiny-pixart", device="cpu")
    info = adapter.info()
    low = ImageParams(seed=1, width=64, height=64, num_inference_steps=3, guidance_scale=1.0).resolve(info, Limits())
    high = ImageParams(seed=1, width=64, height=64, num_inference_steps=3, guidance_scale=6.0).resolve(info, Limits())
    (c1, u1), (c2, u2) = adapter.encode(["a fox", "a fox"], [low, high])
    assert u1 is None and u2 is not None
    a, b = adapter.prepare("a", low, c1, u1), adapter.prepare("b", high, c2, u2)
    for _ in range(3):
        adapter.denoise([a])
        adapter.denoise([b])
    assert (a.latents - b.latents).abs().max().item() > 1e-3


def test_preview_is_an_image_of_the_current_latents():
    adapter = load_adapter("tiny-flux", device="cpu")
    params = ImageParams(seed=1, width=64, height=48, num_inference_steps=4, n=2).resolve(adapter.info(), Limits())
    (cond, uncond), = adapter.encode(["a fox"], [params])
    state = adapter.prepare("a", params, cond, uncond)
    adapter.denoise([state])
    preview = adapter.preview(state)
    assert preview.shape == (2, 48, 64, 3) and preview.dtype == np.uint8
