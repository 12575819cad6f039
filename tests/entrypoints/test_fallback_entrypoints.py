"""A model without a native adapter (tiny-sana) through every front end: serve, batch, generate."""

from __future__ import annotations

import base64
import io
import json
import logging
import subprocess
import sys

import numpy as np
import openai
import pytest
from PIL import Image

from engine.async_engine import AsyncEngine
from engine.params import ImageParams
from entrypoints.batch import run_batch
from tests.helpers import pipeline_reference

pytestmark = pytest.mark.timeout(300)

SANA = "tiny-sana"


def reference(preset_pipelines, prompt: str, seed: int, steps: int) -> np.ndarray:
    params = ImageParams(width=64, height=64, num_inference_steps=steps, seed=seed, guidance_scale=4.5)
    return pipeline_reference(preset_pipelines(SANA), prompt, params)[1][0]


def assert_close(pixels: np.ndarray, ref: np.ndarray) -> None:
    assert pixels.shape == ref.shape
    assert np.abs(pixels.astype(int) - ref.astype(int)).max() <= 1


def test_the_api_server_serves_it_and_refuses_what_it_cannot_do(make_server, preset_pipelines):
    server = make_server(model=SANA)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    result = client.images.generate(model=SANA, prompt="a red fox", size="64x64",
                                    extra_body={"num_inference_steps": 3, "seed": 4})
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).convert("RGB"))
    assert_close(pixels, reference(preset_pipelines, "a red fox", 4, 3))
    assert result.usage.output_tokens == (64 // 2) ** 2  # its VAE factor is 2 and its patch 1
    for body, param in (({"stream": True, "partial_images": 1}, "partial_images"),
                        ({"true_cfg_scale": 0.5}, "true_cfg_scale")):
        with pytest.raises(openai.BadRequestError) as info:
            client.images.generate(model=SANA, prompt="a fox", size="64x64", extra_body=body)
        assert info.value.body["param"] == param


async def test_the_start_up_log_says_so_in_one_line_and_gfdit_batch_runs_its_lines(tmp_path, preset_pipelines,
                                                                                      caplog):
    with caplog.at_level(logging.INFO, logger="engine.async_engine"):
        engine = await AsyncEngine.create(model=SANA, device="cpu", executor="inprocess")
    said = [r for r in caplog.records if "whole-pipeline fallback" in r.getMessage()]
    assert len(said) == 1 and "\n" not in said[0].getMessage()
    try:
        lines = [json.dumps({"id": f"j{i}", "prompt": "a blue cat", "size": 64, "steps": 2, "seed": i})
                 for i in range(2)]
        stats = await run_batch(lines, tmp_path, engine=engine)
    finally:
        await engine.shutdown()
    assert stats.done == 2 and not stats.errors
    for i in range(2):
        pixels = np.asarray(Image.open(tmp_path / f"j{i}_0.png").convert("RGB"))
        assert_close(pixels, reference(preset_pipelines, "a blue cat", i, 2))


@pytest.mark.slow
def test_gfdit_generate_says_so_in_one_line_and_writes_the_image(tmp_path):
    target = tmp_path / "cat.png"
    result = subprocess.run(
        [sys.executable, "-m", "entrypoints.cli", "generate", "a cat", "-o", str(target), "--size", "64",
         "--steps", "2", "--seed", "3", "--model", SANA],
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if "whole-pipeline fallback" in line]
    assert len(said) == 1, result.stderr
    assert Image.open(target).size == (64, 64)
