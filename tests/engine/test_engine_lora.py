"""LoRA through the engine: start-up adapters, per-request adapters sharing steps at degree 2."""

from __future__ import annotations

import numpy as np
import pytest

from engine import AsyncEngine, EngineConfig, ImageParams
from engine.lora_registry import LoraBusyError, LoraPathError, LoraRegistry
from engine.messages import Stage
from engine.params import InvalidParamsError
from engine.scheduler.policies import StaticPolicy
from tests.helpers import record_tasks, run_staggered
from tests.lora_helpers import lora_reference

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(400)]

STAGGERED = [
    ("a red fox", dict(seed=11, num_inference_steps=6, guidance_scale=4.0, loras=({"name": "ink"},))),
    ("a blue cat", dict(seed=12, num_inference_steps=5, guidance_scale=3.0, loras=({"name": "glow", "scale": 0.7},))),
    ("a tree", dict(seed=13, num_inference_steps=6, guidance_scale=5.0,
                    loras=({"name": "ink", "scale": 0.5}, {"name": "glow", "scale": 1.4}))),
    ("snow", dict(seed=14, num_inference_steps=5, guidance_scale=4.0)),
]


@pytest.mark.slow
async def test_mixed_adapters_at_degree_two_on_two_workers_match_diffusers(lora_pipelines):
    pipe, root, _ = lora_pipelines("tiny-flux")
    config = EngineConfig.create(model="tiny-flux", device="cpu", num_workers=2, policy="static",
                                 static_degree=2, max_batch_size=8, lora=("ink=ink", "glow=glow"),
                                 lora_dir=str(root))
    engine = AsyncEngine(config)
    await engine.start()
    try:
        assert [e["name"] for e in engine.list_loras()] == ["glow", "ink"]
        # One degree-2 lane that batches: staggered requests join the lane's running batch.
        engine.scheduler.policy = StaticPolicy(static_degree=2, batch=True)
        tasks = record_tasks(engine)
        outputs = await run_staggered(engine, STAGGERED)
    finally:
        await engine.shutdown()
    denoise = [(task, steps) for task, steps in tasks if task.stage == Stage.DENOISE]
    assert all(len(task.group) == 2 for task, _ in denoise)
    mixes = {out.request_id: tuple(out.params.loras) for out in outputs}
    shared = [t for t, steps in denoise if len({mixes[r] for r in t.request_ids}) > 1 and len(set(steps)) > 1]
    assert shared, "no denoise call mixed adapters of requests at different steps"
    for (prompt, _), out in zip(STAGGERED, outputs):
        ref_latents, ref_pixels = lora_reference(pipe, prompt, out.params)
        assert np.abs(out.latents - ref_latents.numpy()).max() <= 1e-4, prompt
        pixels = np.stack([image.to_numpy() for image in out.images])
        assert np.abs(pixels.astype(int) - ref_pixels.astype(int)).max() <= 1, prompt


async def test_unknown_adapters_eviction_and_refusals(lora_pipelines, tmp_path):
    _, root, _ = lora_pipelines("tiny-flux")
    engine = await AsyncEngine.create(model="tiny-flux", device="cpu", executor="inprocess", lora_dir=str(root),
                                      max_loras=1)
    try:
        with pytest.raises(InvalidParamsError) as err:
            [o async for o in engine.generate("a fox", ImageParams(loras=({"name": "ink"},)))]
        assert err.value.param == "loras"
        await engine.load_lora("ink", "ink")
        with pytest.raises(LoraPathError):
            await engine.load_lora("x", "../outside")
        with pytest.raises(InvalidParamsError, match="not loaded"):
            await engine.load_lora("x", "missing.safetensors")
        params = ImageParams(width=64, height=64, num_inference_steps=12, loras=({"name": "ink"},))
        stream = engine.generate("a fox", params)
        await stream.__anext__()  # running, and using ink
        with pytest.raises(LoraBusyError):
            await engine.unload_lora("ink")
        with pytest.raises(LoraBusyError):  # max_loras=1 and the one resident is in use
            await engine.load_lora("glow", "glow")
        out = [o async for o in stream][-1]
        assert out.finished and len(out.images) == 1
        await engine.load_lora("glow", "glow")  # ink is idle now: least recently used goes
        assert [e["name"] for e in engine.list_loras()] == ["glow"]
        await engine.unload_lora("glow")
        assert engine.list_loras() == [] and engine.executor._worker.adapter.lora.adapters == {}
    finally:
        await engine.shutdown()


def test_paths_stay_inside_the_lora_dir(tmp_path):
    (tmp_path / "inside").mkdir()
    (tmp_path / "inside" / "a.safetensors").write_bytes(b"")
    (tmp_path / "secret.safetensors").write_bytes(b"")
    (tmp_path / "inside" / "link.safetensors").symlink_to(tmp_path / "secret.safetensors")
    registry = LoraRegistry(str(tmp_path / "inside"), 2)
    assert registry.resolve_path("a.safetensors") == str(tmp_path / "inside" / "a.safetensors")
    for bad in ("../secret.safetensors", str(tmp_path / "secret.safetensors"), "link.safetensors"):
        with pytest.raises(LoraPathError):
            registry.resolve_path(bad)
    with pytest.raises(ValueError, match="NAME=PATH"):
        LoraRegistry.parse_startup("nopath")
