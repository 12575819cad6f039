"""The xformers attention backend on CUDA: chosen where it works, and as right as SDPA.

With ``attention_backend="xformers"`` the engine's own attention processors run
``xformers.ops.memory_efficient_attention`` at degree 1 too (engine/distributed/ulysses.py),
so this is the whole xformers path against the plain pipeline, which attends with SDPA.
"""

from __future__ import annotations

import pytest
import torch

from engine.models.attention import resolve_attention_backend, xformers_problem
from tests.cuda_helpers import REQUESTS_512, assert_within_bf16, requires_cuda
from tests.helpers import run_staggered

pytestmark = [pytest.mark.gpu, requires_cuda]


@pytest.fixture(scope="module")
def xformers_usable():
    problem = xformers_problem(torch.device("cuda"))
    if problem:
        pytest.skip(problem)


def test_auto_picks_xformers_where_it_runs(xformers_usable):
    assert resolve_attention_backend("auto", torch.device("cuda")) == "xformers"
    assert resolve_attention_backend("xformers", torch.device("cuda")) == "xformers"


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
async def test_xformers_engine_matches_diffusers(xformers_usable, scaled_folders, family):
    from engine import AsyncEngine

    folder = scaled_folders(family)
    engine = await AsyncEngine.create(model=folder, device="cuda", dtype="bfloat16", executor="inprocess",
                                      attention_backend="xformers", telemetry_period_s=0)
    try:
        assert engine.executor._worker.sp.backend == "xformers"
        outputs = await run_staggered(engine, REQUESTS_512, width=512, height=512)
    finally:
        await engine.shutdown()
    assert_within_bf16(outputs, REQUESTS_512, folder)
