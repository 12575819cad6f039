"""Qwen-Image and Z-Image at the adapter level: staggered batches give the plain pipeline's images.

The requests differ in prompt length (so batches pad and mask), seed, steps, n and
guidance: Qwen-Image's true CFG with and without a negative prompt (an empty one counts),
Z-Image's CFG with its per-request normalisation and truncation.
"""

import numpy as np
import pytest
import torch

from engine.models.loader import load_adapter
from engine.params import ImageParams, Limits
from tests.helpers import pipeline_reference

QWEN_REQUESTS = [
    ("a red fox", dict(seed=1, num_inference_steps=6, true_cfg_scale=4.0, negative_prompt="blurry")),
    ("a blue cat in the city at night with the moon over the river", dict(seed=2, num_inference_steps=4,
                                                                       true_cfg_scale=2.5, negative_prompt="")),
    ("tree", dict(seed=3, num_inference_steps=5, n=2)),  # no negative prompt: no true CFG
    ("sky over the sea", dict(seed=4, num_inference_steps=3, true_cfg_scale=1.0, negative_prompt="dark")),
    ("a dragon", dict(seed=5, num_inference_steps=5, true_cfg_scale=6.0,
                      negative_prompt="an old small dark photo of a house in the rain")),
]
Z_REQUESTS = [
    ("a red fox", dict(seed=1, num_inference_steps=6, guidance_scale=4.0, negative_prompt="blurry")),
    ("a blue cat in the city at night with the moon over the river", dict(
        seed=2, num_inference_steps=4, guidance_scale=2.5, cfg_normalization=1.2)),
    ("tree", dict(seed=3, num_inference_steps=5, guidance_scale=3.0, n=2, cfg_truncation=0.5)),
    ("sky over the sea", dict(seed=4, num_inference_steps=3, guidance_scale=0.0, negative_prompt="dark")),
    ("a dragon", dict(seed=5, num_inference_steps=5, guidance_scale=0.7, cfg_normalization=1.0,
                      cfg_truncation=0.3, negative_prompt="an old small dark photo of a house in the rain")),
]
CASES = [("tiny-qwen-image", QWEN_REQUESTS), ("tiny-z-image", Z_REQUESTS)]


@pytest.mark.parametrize("preset, requests", CASES, ids=[c[0] for c in CASES])
def test_staggered_batches_match_the_pipeline(preset, requests, preset_pipelines):
    adapter = load_adapter(preset, device="cpu")
    info = adapter.info()
    params = [ImageParams(width=64, height=64, **kw).resolve(info, Limits()) for _, kw in requests]
    prompts = [p for p, _ in requests]
    embeds = adapter.encode(prompts, params)
    states = [adapter.prepare(str(i), p, *embeds[i]) for i, p in enumerate(params)]
    assert [s.uncond is not None for s in states] == [info.guided(p) for p in params]
    # Request i joins at tick i; requests with and without guidance batch apart (their keys differ).
    tick = 0
    while any(not s.done for s in states):
        running = [s for s in states[: tick + 1] if not s.done]
        for guided in (True, False):
            batch = [s for s in running if (s.uncond is not None) == guided]
            if batch:
                adapter.denoise(batch)
        tick += 1
    images = adapter.decode(states)
    pipe = preset_pipelines(preset)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        ref_latents, ref_pixels = pipeline_reference(pipe, prompt, p)
        assert (states[i].latents - ref_latents).abs().max().item() <= 1e-4, f"request {i}"
        assert images[i].shape == (p.n, 64, 64, 3)
        assert np.abs(images[i].astype(int) - ref_pixels.astype(int)).max() <= 1, f"request {i}"


def test_qwen_image_guidance_follows_the_pipeline_rule():
    info = load_adapter("tiny-qwen-image", device="cpu").info()

    def guided(**kw):
        return info.guided(ImageParams(width=64, height=64, **kw).resolve(info, Limits()))

    assert guided(negative_prompt="") and guided(negative_prompt="x", true_cfg_scale=1.5)
    assert not guided() and not guided(negative_prompt="x", true_cfg_scale=1.0)
    assert not guided(guidance_scale=7.0)  # guidance_scale is for guidance-distilled checkpoints only


def test_qwen_image_prompts_pad_with_a_mask_and_padding_without_it_is_wrong():
    adapter = load_adapter("tiny-qwen-image", device="cpu")
    params = [ImageParams(seed=s, width=64, height=64, num_inference_steps=2).resolve(adapter.info(), Limits())
              for s in (1, 2)]
    (short, _), (long, _) = adapter.encode(["a fox", "a red fox in the forest at night"], params)
    assert short["encoder_hidden_states"].shape[1] < long["encoder_hidden_states"].shape[1]
    batch = adapter.concat_embeds([short, long])
    assert batch["encoder_hidden_states_mask"].sum(dim=1).tolist() == [
        short["encoder_hidden_states"].shape[1], long["encoder_hidden_states"].shape[1]]
    state = adapter.prepare("a", params[0], short, None)
    timesteps = adapter._timestep_rows(state).expand(2)
    latents = torch.cat([state.latents, state.latents])
    with torch.inference_mode():
        alone = adapter._forward(state.latents, timesteps[:1], short, [state], torch.ones(1))
        masked = adapter._forward(latents, timesteps, batch, [state], torch.ones(2))[:1]
        unmasked = adapter._forward(latents, timesteps, {"encoder_hidden_states": batch["encoder_hidden_states"]},
                                    [state], torch.ones(2))[:1]
    assert (masked - alone).abs().max().item() <= 1e-5
    assert (unmasked - alone).abs().max().item() > 1e-3


def test_qwen_image_true_cfg_keeps_the_conditional_norm():
    adapter = load_adapter("tiny-qwen-image", device="cpu")
    params = ImageParams(seed=1, width=64, height=64, negative_prompt="", true_cfg_scale=5.0).resolve(
        adapter.info(), Limits())
    (cond, uncond), = adapter.encode(["a fox"], [params])
    state = adapter.prepare("a", params, cond, uncond)
    u, c = torch.randn(2, 1, 16, 64, generator=torch.Generator().manual_seed(0))
    combined = adapter.combine_guidance(state, u, c)
    assert torch.allclose(combined.norm(dim=-1), c.norm(dim=-1), rtol=1e-5)
    assert (combined - c).abs().max() > 0.1


@pytest.mark.parametrize("preset", ["tiny-qwen-image", "tiny-z-image"])
def test_the_prompt_token_limit_counts_as_the_pipeline_tokenizes(preset, preset_pipelines):
    from engine.params import InvalidParamsError, check_prompt

    info = load_adapter(preset, device="cpu").info()
    pipe = preset_pipelines(preset)
    limit = info.prompt_limit
    for prompt in ("a fox", "  a red fox, in the forest!\nat night  ", "zebra " * 40):
        if preset == "tiny-qwen-image":
            tokens = len(pipe.tokenizer(pipe.prompt_template_encode.format(prompt)).input_ids) - 34
        else:
            text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True, enable_thinking=True)
            tokens = len(pipe.tokenizer(text).input_ids)
        assert limit.count(prompt) == tokens
    longest = " ".join(["fox"] * (limit.max_tokens - limit.count("")))
    assert limit.count(longest) == limit.max_tokens
    check_prompt(longest, Limits(), info)
    with pytest.raises(InvalidParamsError, match="tokens") as refused:
        check_prompt(longest + " fox", Limits(), info)
    assert refused.value.param == "prompt"
    with pytest.raises(InvalidParamsError) as refused:
        ImageParams(negative_prompt=longest + " fox").resolve(info, Limits())
    assert refused.value.param == "negative_prompt"
