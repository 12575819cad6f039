"""The engine with cost-aware policies: the profile reaches the policy, images do not change."""

import asyncio

import numpy as np
import pytest

from engine import AsyncEngine, ImageParams
from engine.async_engine import load_cost_model
from engine.messages import ModelInfo
from engine.model_info import LatentSpec
from engine.scheduler.profile import Point, Profile

INFO = ModelInfo(name="small-pixart", family="pixart", default_width=512, default_height=512, default_steps=20,
                 default_guidance=4.5, latent=LatentSpec(channels=4, spatial_compression=8, patch_size=2),
                 max_size=4096, num_heads=8, guidance="cfg", device="cpu",
                 dtype="float32")


def tiny_profile(path):
    Profile("tiny-pixart", 16, 20, (Point("denoise", 64, 64, 1, 1, 3.0), Point("denoise", 128, 128, 1, 1, 6.0),
                                    Point("decode", 64, 64, 1, 1, 5.0))).save(path)
    return str(path)


def test_the_engine_takes_the_profile_asked_for_else_the_shipped_one_for_its_model(tmp_path):
    assert load_cost_model(None, INFO).profile.model == "small-pixart"
    assert load_cost_model(tiny_profile(tmp_path / "p.json"), INFO).profile.model == "tiny-pixart"
    other = ModelInfo(**{f: getattr(INFO, f) for f in INFO.__struct_fields__ if f != "name"}, name="unknown")
    assert load_cost_model(None, other) is None


async def final_image(engine, prompt, params):
    async for out in engine.generate(prompt, params):
        last = out
    return last.images[0].to_numpy()


async def test_elastic_serves_the_same_images_as_fcfs(tmp_path):
    requests = [("a red fox", ImageParams(width=64, height=64, num_inference_steps=4, seed=1, deadline_s=30.0,
                                          output_format="raw")),
                ("a blue cat", ImageParams(width=64, height=64, num_inference_steps=3, seed=2, priority=1,
                                           output_format="raw"))]
    images = {}
    for policy in ("fcfs", "elastic"):
        engine = await AsyncEngine.create(model="tiny-pixart", policy=policy, profile=tiny_profile(tmp_path / "p.json"))
        try:
            assert engine.scheduler.policy.name == policy

            images[policy] = await asyncio.gather(*(final_image(engine, p, q) for p, q in requests))
        finally:
            await engine.shutdown()
    for a, b in zip(images["fcfs"], images["elastic"]):
        np.testing.assert_array_equal(a, b)


async def test_a_cost_aware_policy_without_a_profile_refuses_to_start():
    with pytest.raises(ValueError, match="needs a cost model"):
        await AsyncEngine.create(model="tiny-pixart", policy="edf")
