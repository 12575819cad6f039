"""Per-row LoRA inside shared denoise calls equals diffusers' own LoRA, one request at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.models.loader import load_adapter
from engine.models.lora_files import LoraFileError
from engine.params import ImageParams, InvalidParamsError, Limits, LoraRef
from tests.lora_helpers import lora_reference as reference

LORA_PRESETS = ["tiny-flux", "tiny-sd3", "tiny-pixart", "tiny-qwen-image"]
# Two adapters, one request with both at different scales, one with none; staggered.
REQUESTS = [
    ("a red fox", dict(seed=1, num_inference_steps=5, guidance_scale=4.0), [LoraRef(name="ink", scale=1.0)]),
    ("a blue cat", dict(seed=2, num_inference_steps=4, guidance_scale=3.0, negative_prompt="blurry"),
     [LoraRef(name="glow", scale=0.8)]),
    ("a tree", dict(seed=3, num_inference_steps=5, guidance_scale=5.0, n=2),
     [LoraRef(name="ink", scale=0.6), LoraRef(name="glow", scale=1.3)]),
    ("the sea", dict(seed=4, num_inference_steps=4, guidance_scale=4.0), []),
]


@pytest.fixture
def lora_setup(lora_pipelines):
    return lambda preset: lora_pipelines(preset)[::2]


@pytest.mark.slow
@pytest.mark.parametrize("preset", LORA_PRESETS)
def test_mixed_adapters_in_shared_batches_match_diffusers(preset, lora_setup):
    pipe, paths = lora_setup(preset)
    adapter = load_adapter(preset, device="cpu")
    for name, path in paths.items():
        adapter.lora.load(name, path)
    info = adapter.info()
    params = [ImageParams(width=64, height=64, loras=tuple(refs), **_guided(info, kw)).resolve(info, Limits())
              for _, kw, refs in REQUESTS]
    prompts = [p for p, _, _ in REQUESTS]
    embeds = adapter.encode(prompts, params)
    states = [adapter.prepare(str(i), p, *embeds[i]) for i, p in enumerate(params)]
    tick, widest = 0, 0
    while any(not s.done for s in states):
        batch = [s for s in states[: tick + 1] if not s.done]
        widest = max(widest, len({tuple(s.params.loras) for s in batch}))
        adapter.denoise(batch)
        tick += 1
    assert widest == 4  # every adapter mix (and none) shared one transformer call
    images = adapter.decode(states)
    plain = None
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        ref_latents, ref_pixels = reference(pipe, prompt, p)
        assert (states[i].latents - ref_latents).abs().max().item() <= 1e-4, f"request {i}"
        assert np.abs(images[i].astype(int) - ref_pixels.astype(int)).max() <= 1, f"request {i}"
        if i == 0:
            plain = reference(pipe, prompt, ImageParams(**{**_fields(p), "loras": ()}))[0]
    # The adapters change the image: the test would catch a LoRA that is not applied.
    assert (states[0].latents - plain).abs().max().item() > 1e-2


def _guided(info, kw: dict) -> dict:
    """Under true CFG a negative prompt turns guidance on, and guided and unguided requests
    never share a call: every request gets one, so all four adapter mixes still do."""
    if info.guidance == "true_cfg":
        return {"negative_prompt": "blurry", **kw}
    return kw


def _fields(params: ImageParams) -> dict:
    import msgspec

    return msgspec.structs.asdict(params)


def test_store_unload_removes_the_delta(lora_setup):
    pipe, paths = lora_setup("tiny-flux")
    adapter = load_adapter("tiny-flux", device="cpu")
    x = torch.randn(1, 4, adapter.transformer.transformer_blocks[0].attn.to_q.in_features).repeat(3, 1, 1)
    layer = adapter.transformer.transformer_blocks[0].attn.to_q
    base = layer(x)
    summary = adapter.lora.load("ink", paths["ink"])
    assert summary.rank == 4 and summary.modules > 0
    with adapter.lora.rows([[LoraRef(name="ink")], [], [LoraRef(name="ink", scale=-1.0)]], x.device, x.dtype):
        out = layer(x)
    assert torch.equal(out[1], base[1])
    assert (out[0] - base[0]).abs().max() > 1e-3
    torch.testing.assert_close(out[0] - base[0], -(out[2] - base[2]), rtol=1e-4, atol=1e-5)
    assert torch.equal(layer(x), base)  # outside a call no row has an adapter
    assert adapter.lora.unload("ink") and not adapter.lora.unload("ink")
    assert not layer._forward_hooks


def test_bad_adapter_files_are_refused_by_name(tmp_path, lora_setup):
    _, paths = lora_setup("tiny-flux")
    adapter = load_adapter("tiny-flux", device="cpu")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(LoraFileError, match="not a readable LoRA adapter"):
        adapter.lora.load("x", corrupt)
    with pytest.raises(LoraFileError, match="no adapter file"):
        adapter.lora.load("x", tmp_path / "missing.safetensors")
    pickle = tmp_path / "weights.bin"
    pickle.write_bytes(b"x")
    with pytest.raises(LoraFileError, match="safetensors files only"):
        adapter.lora.load("x", pickle)
    sd3 = load_adapter("tiny-sd3", device="cpu")  # a FLUX adapter on SD3: no such modules
    with pytest.raises(LoraFileError):
        sd3.lora.load("x", paths["ink"])
    assert not adapter.lora.adapters and not sd3.lora.adapters


def test_loras_are_validated():
    info = load_adapter("tiny-flux", device="cpu").info()
    ok = ImageParams(loras=({"name": "a", "scale": 0.5},)).resolve(info, Limits())
    assert ok.loras == (LoraRef(name="a", scale=0.5),)
    for bad in ([{"name": "a", "scale": 99}], [{"name": ""}], [{"name": "a"}, {"name": "a"}],
                [{"name": "a", "weight": 1}], "a", [{"name": str(i)} for i in range(5)]):
        with pytest.raises(InvalidParamsError) as err:
            ImageParams(loras=bad).resolve(info, Limits())
        assert err.value.param == "loras"
