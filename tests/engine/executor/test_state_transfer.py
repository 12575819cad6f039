"""A request moved between workers (packed to bytes and back) continues exactly."""

import pytest

from engine.executor.state_transfer import pack_state, unpack_state
from engine.models.loader import load_adapter
from engine.request import ImageParams, Limits
from tests.helpers import FAMILY_PRESETS


@pytest.mark.parametrize("preset", FAMILY_PRESETS)
def test_a_moved_request_continues_bit_for_bit(preset):
    adapter = load_adapter(preset, device="cpu")
    params = ImageParams(seed=3, width=64, height=64, num_inference_steps=6, guidance_scale=3.0,
                         n=2).resolve(adapter.info(), Limits())
    (cond, uncond), = adapter.encode(["a red fox"], [params])
    still = adapter.prepare("r", params, cond, uncond)
    moved = adapter.prepare("r", params, cond, uncond)
    for step in range(params.num_inference_steps):
        adapter.denoise([still])
        adapter.denoise([moved])
        if step in (1, 3):  # multistep solvers carry past outputs across the move
            moved = unpack_state(pack_state(moved), adapter)
            assert moved.step == step + 1
    assert (still.latents - moved.latents).abs().max().item() == 0.0
    assert moved.request_id == "r" and moved.params == params


def test_unknown_values_are_refused():
    from engine.executor.state_transfer import _Packer

    with pytest.raises(TypeError, match="cannot move"):
        _Packer().encode(object())
