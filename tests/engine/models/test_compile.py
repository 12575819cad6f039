"""Regional compile: the repeated blocks compiled once for every batch size, outputs as eager.

The fast tests compile with dynamo's ``eager`` backend (the same tracing, guards and
dynamic shapes as inductor, without inductor's code generation, which takes minutes on
a shared 2-core CPU); the slow one runs inductor through the engine, the gpu one
inductor's Triton kernels in bf16.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from engine.config import EngineConfig, add_engine_args, engine_options_from_args
from engine.models.compile import compile_repeated_blocks, repeated_blocks
from engine.models.loader import load_adapter
from engine.request import ImageParams
from tests.cuda_helpers import REQUESTS_512, assert_within_bf16, requires_cuda
from tests.helpers import STAGGERED, assert_matches_pipeline, run_staggered


def _states(adapter, guidance_scales: list[float]):
    params = [ImageParams(width=64, height=64, num_inference_steps=4, guidance_scale=g, seed=i, n=1,
                          negative_prompt="", output_format="raw") for i, g in enumerate(guidance_scales)]
    return adapter.new_states([str(i) for i in range(len(params))], [f"a prompt {i}" for i in range(len(params))],
                              params)


@pytest.fixture(scope="module")
def eager_and_compiled():
    return load_adapter("tiny-pixart", "cpu"), load_adapter("tiny-pixart", "cpu")


def test_one_graph_serves_every_batch_size_and_matches_eager(eager_and_compiled):
    eager, compiled = eager_and_compiled
    stats = compile_repeated_blocks(compiled.transformer, backend="eager")
    # CFG rows: 2, 4, 6, then 2 again; one graph with a dynamic batch serves them all.
    for scales in ([4.0], [4.0, 3.0], [4.0, 3.0, 2.0], [5.0]):
        plain, traced = _states(eager, scales), _states(compiled, scales)
        for _ in range(2):
            eager.denoise(plain)
            compiled.denoise(traced)
        for a, b in zip(plain, traced):
            assert torch.allclose(a.latents, b.latents, atol=1e-6, rtol=0)
        assert stats.graphs == 1
    # A single row (no CFG) is specialised by PyTorch: one more graph, and only one.
    for _ in range(2):
        plain, traced = _states(eager, [1.0]), _states(compiled, [1.0])
        eager.denoise(plain)
        compiled.denoise(traced)
        assert torch.allclose(plain[0].latents, traced[0].latents, atol=1e-6, rtol=0)
    assert stats.graphs == 2
    assert stats.by_block == {"BasicTransformerBlock": 2}


def test_eager_when_runs_the_blocks_uncompiled():
    adapter = load_adapter("tiny-pixart", "cpu")
    stats = compile_repeated_blocks(adapter.transformer, backend="eager", eager_when=lambda: True)
    adapter.denoise(_states(adapter, [4.0]))
    assert stats.graphs == 0


@pytest.mark.parametrize("preset, expected", [
    ("tiny-pixart", {"BasicTransformerBlock": 2}),
    ("tiny-sd3", {"JointTransformerBlock": 2}),
    ("tiny-flux", {"FluxTransformerBlock": 1, "FluxSingleTransformerBlock": 1}),
])
def test_repeated_blocks_of_every_family(preset_pipelines, preset, expected):
    blocks = repeated_blocks(preset_pipelines(preset).transformer)
    counts: dict[str, int] = {}
    for block in blocks:
        counts[type(block).__name__] = counts.get(type(block).__name__, 0) + 1
    assert counts == expected


def test_a_model_without_blocks_is_refused():
    with pytest.raises(ValueError, match="no repeated blocks"):
        repeated_blocks(torch.nn.Linear(2, 2))


def test_compile_flag():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert EngineConfig.create(**engine_options_from_args(parser.parse_args(["--compile"]))).model.compile
    assert not EngineConfig.create(**engine_options_from_args(parser.parse_args([]))).model.compile
    assert "torch.compile" in parser.format_help()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # inductor's C++ code generation takes minutes on a shared 2-core CPU
async def test_inductor_compiled_engine_matches_the_pipeline(preset_pipelines):
    """Inductor on CPU fp32: staggered requests (batches of 2-8 rows) within 1e-4 of the pipeline."""
    from engine import AsyncEngine

    engine = await AsyncEngine.create(model="tiny-pixart", device="cpu", executor="inprocess", compile=True)
    try:
        outputs = await run_staggered(engine, STAGGERED)
        stats = engine.executor._worker.compile_stats
    finally:
        await engine.shutdown()
    pipe = preset_pipelines("tiny-pixart")
    for (prompt, _), out in zip(STAGGERED, outputs):
        assert_matches_pipeline(pipe, prompt, out)
    # Every batch here has 2 rows or more (CFG): one graph, however the batch changes.
    assert stats is not None and stats.graphs == 1


@pytest.mark.gpu
@requires_cuda
async def test_compiled_engine_on_cuda_matches_diffusers(scaled_folders):
    """Inductor (Triton) in bf16 at 512x512 on a real-width PixArt: within the bf16 tolerance."""
    from engine import AsyncEngine

    folder = scaled_folders("pixart")
    engine = await AsyncEngine.create(model=folder, device="cuda", dtype="bfloat16", executor="inprocess",
                                      attention_backend="sdpa", compile=True, telemetry_period_s=0)
    try:
        outputs = await run_staggered(engine, REQUESTS_512, width=512, height=512)
        stats = engine.executor._worker.compile_stats
    finally:
        await engine.shutdown()
    assert_within_bf16(outputs, REQUESTS_512, folder)
    assert stats is not None and stats.graphs == 1
