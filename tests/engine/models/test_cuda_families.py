"""bf16 on CUDA at 512x512: the engine against the plain diffusers pipeline, every family.

Real-width random transformers (tests/cuda_helpers.py); staggered requests share batches
at different steps, as in the CPU tests, and each must stay within the bf16 tolerance
measured beside it.
"""

from __future__ import annotations

import pytest

from tests.cuda_helpers import REQUESTS_512, assert_within_bf16, requires_cuda
from tests.helpers import run_staggered

pytestmark = [pytest.mark.gpu, requires_cuda]


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
async def test_bf16_engine_matches_diffusers_at_512(scaled_folders, family):
    from engine import AsyncEngine

    folder = scaled_folders(family)
    engine = await AsyncEngine.create(model=folder, device="cuda", dtype="bfloat16", executor="inprocess",
                                      attention_backend="sdpa", telemetry_period_s=0)
    try:
        assert engine.model_info.dtype == "bfloat16"
        outputs = await run_staggered(engine, REQUESTS_512, width=512, height=512)
    finally:
        await engine.shutdown()
    assert_within_bf16(outputs, REQUESTS_512, folder)
