"""What a LoRA row costs the scheduler: the profile's lora_overhead on the per-image work."""

from __future__ import annotations

import dataclasses

import pytest

from engine.params import ImageParams, LoraRef
from engine.scheduler.cost_model import CostModel
from engine.scheduler.profile import Point, Profile, ProfileError
from tests.scheduling_helpers import MODEL

POINTS = (Point("denoise", 512, 512, 1, 1, 30.0), Point("denoise", 512, 512, 4, 1, 90.0),
          Point("denoise", 1024, 1024, 1, 1, 110.0), Point("denoise", 1024, 1024, 4, 1, 410.0))


def test_lora_images_pay_the_overhead_on_per_image_work_only():
    plain = CostModel(Profile("m", 16, 10, POINTS))
    lora = CostModel(Profile("m", 16, 10, POINTS, lora_overhead=0.2))
    tokens = plain.tokens(512, 512)
    fixed = plain.fit("denoise").coef[0] / 1e3
    for batch in (1, 4):
        base = plain.step_s(tokens, batch)
        assert lora.step_s(tokens, batch) == pytest.approx(base)
        assert lora.step_s(tokens, batch, lora=True) == pytest.approx(fixed + 1.2 * (base - fixed))
    assert plain.step_s(tokens, 4, lora=True) == pytest.approx(plain.step_s(tokens, 4))  # unmeasured: free


def test_the_overhead_survives_json_and_is_bounded():
    profile = Profile("m", 16, 10, POINTS, lora_overhead=0.15)
    assert Profile.from_dict(profile.to_dict()).lora_overhead == 0.15
    with pytest.raises(ProfileError, match="lora_overhead"):
        Profile.from_dict({**profile.to_dict(), "lora_overhead": -1})
    assert dataclasses.replace(Profile.from_dict({**profile.to_dict()}), lora_overhead=0).lora_overhead == 0


def test_adapters_mark_the_key_but_do_not_split_batches():
    plain = MODEL.batch_key(ImageParams(width=64, height=64, guidance_scale=4.5))
    styled = MODEL.batch_key(ImageParams(width=64, height=64, guidance_scale=4.5,
                                         loras=(LoraRef(name="b"), LoraRef(name="a", scale=0.5))))
    assert plain.adapter is None and styled.adapter == "a+b" and plain == styled

