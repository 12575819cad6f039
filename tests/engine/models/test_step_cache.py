"""Per-request step caching inside shared denoise calls, at the adapter (one process)."""

from __future__ import annotations

import pytest
import torch

from engine.executor.state_transfer import pack_state, unpack_state
from engine.models.loader import load_adapter
from engine.params import ImageParams, Limits, StepCache

# PixArt (the default model's family) in the default run, the others in the slow one.
CACHE_FAMILIES = ["tiny-pixart", *(pytest.param(p, marks=pytest.mark.slow)
                                   for p in ("tiny-flux", "tiny-sd3", "tiny-qwen-image"))]
# A threshold this loose caches whatever the bound allows, so the tests see cached steps
# on random-weight models; the bound keeps every third step computed.
LOOSE = StepCache(threshold=1.0, max_cached_steps=2)


@pytest.fixture(scope="module")
def adapters():
    cache = {}

    def get(preset: str):
        if preset not in cache:
            cache[preset] = load_adapter(preset, device="cpu")
        return cache[preset]

    return get


def _states(adapter, requests):
    info = adapter.info()
    params = [ImageParams(width=64, height=64, **kw).resolve(info, Limits()) for _, kw in requests]
    embeds = adapter.encode([p for p, _ in requests], params)
    return [adapter.prepare(str(i), p, *embeds[i]) for i, p in enumerate(params)]


def _run_alone(adapter, requests):
    states = _states(adapter, requests)
    for s in states:
        while not s.done:
            adapter.denoise([s])
    return states


def _run_staggered(adapter, requests):
    """Request i joins at tick i, so calls mix requests at different steps."""
    states = _states(adapter, requests)
    tick = 0
    while any(not s.done for s in states):
        adapter.denoise([s for s in states[: tick + 1] if not s.done])
        tick += 1
    return states


@pytest.mark.parametrize("preset", CACHE_FAMILIES)
def test_threshold_zero_is_bitwise_no_cache(preset, adapters):
    adapter = adapters(preset)
    kw = dict(seed=5, num_inference_steps=5, guidance_scale=4.0, n=2)
    plain = _run_staggered(adapter, [("a red fox", kw), ("a blue cat", {**kw, "seed": 6})])
    zero = _run_staggered(adapter, [("a red fox", {**kw, "cache": StepCache(threshold=0.0)}),
                                    ("a blue cat", {**kw, "seed": 6, "cache": StepCache(threshold=0.0)})])
    for a, b in zip(plain, zero):
        assert torch.equal(a.latents, b.latents)
        assert b.cached_steps == 0 and "first" in b.cache  # the cache ran, and reused nothing


@pytest.mark.parametrize("preset", CACHE_FAMILIES)
def test_a_mixed_batch_equals_each_request_alone(preset, adapters):
    adapter = adapters(preset)
    requests = [
        ("a red fox", dict(seed=1, num_inference_steps=7, guidance_scale=4.0, cache=LOOSE)),
        ("a blue cat", dict(seed=2, num_inference_steps=6, guidance_scale=3.0)),
        ("a tree", dict(seed=3, num_inference_steps=7, guidance_scale=5.0, n=2,
                        cache=StepCache(threshold=1.0, max_cached_steps=1))),
        ("the sea", dict(seed=4, num_inference_steps=6, guidance_scale=4.0, cache=StepCache(threshold=0.0))),
    ]
    mixed = _run_staggered(adapter, requests)
    alone = _run_alone(adapter, requests)
    for i, (m, a) in enumerate(zip(mixed, alone)):
        assert m.cached_steps == a.cached_steps, f"request {i}"
        assert (m.latents - a.latents).abs().max().item() <= 1e-4, f"request {i}"
    assert [s.cached_steps for s in mixed] == [4, 0, 3, 0]


def test_first_and_last_steps_compute_and_the_bound_holds(adapters):
    adapter = adapters("tiny-pixart")
    (state,) = _states(adapter, [("a red fox", dict(seed=1, num_inference_steps=8, guidance_scale=4.0,
                                                    cache=LOOSE))])
    history = []
    while not state.done:
        before = state.cached_steps
        adapter.denoise([state])
        history.append(state.cached_steps > before)
    # Computed at steps 0 and 7; at most two cached in a row.
    assert history == [False, True, True, False, True, True, False, False]


def test_caching_changes_the_image_a_little(adapters):
    adapter = adapters("tiny-pixart")
    kw = dict(seed=1, num_inference_steps=8, guidance_scale=4.0)
    (plain,) = _run_alone(adapter, [("a red fox", kw)])
    (cached,) = _run_alone(adapter, [("a red fox", {**kw, "cache": LOOSE})])
    diff = (plain.latents - cached.latents).abs().max().item()
    assert 0 < diff < plain.latents.abs().max().item()


def test_a_cached_request_moved_mid_way_continues_bit_for_bit(adapters):
    adapter = adapters("tiny-pixart")
    kw = dict(seed=3, num_inference_steps=7, guidance_scale=3.0, n=2, cache=LOOSE)
    (still,) = _states(adapter, [("a red fox", kw)])
    (moved,) = _states(adapter, [("a red fox", kw)])
    for step in range(7):
        adapter.denoise([still])
        adapter.denoise([moved])
        if step in (1, 2):  # after a computed step, and after a cached one
            moved = unpack_state(pack_state(moved), adapter)
    assert torch.equal(still.latents, moved.latents)
    assert moved.cached_steps == still.cached_steps == 4


def test_only_families_with_a_block_stack_have_a_step_cache(adapters):
    assert adapters("tiny-pixart").info().step_cache
    # The whole-pipeline fallback runs diffusers' own loop: no step cache, so a 400.
    assert not load_adapter("tiny-flux", device="cpu", backend="diffusers").info().step_cache


@pytest.mark.slow
def test_lora_rows_follow_the_rows_that_compute(lora_pipelines):
    from engine.params import LoraRef

    _, _, paths = lora_pipelines("tiny-flux")
    adapter = load_adapter("tiny-flux", device="cpu")
    for name, path in paths.items():
        adapter.lora.load(name, path)
    requests = [
        ("a red fox", dict(seed=1, num_inference_steps=6, guidance_scale=4.0, cache=LOOSE,
                           loras=(LoraRef(name="ink"),))),
        ("a blue cat", dict(seed=2, num_inference_steps=6, guidance_scale=3.0, loras=(LoraRef(name="glow"),))),
        ("a tree", dict(seed=3, num_inference_steps=6, guidance_scale=5.0, n=2)),
    ]
    mixed = _run_staggered(adapter, requests)
    alone = _run_alone(adapter, requests)
    for m, a in zip(mixed, alone):
        assert m.cached_steps == a.cached_steps
        assert (m.latents - a.latents).abs().max().item() <= 1e-4
    assert mixed[0].cached_steps == 3
