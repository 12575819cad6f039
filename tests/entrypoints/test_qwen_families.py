"""Qwen-Image and Z-Image through the front ends: the API over real HTTP, gfdit batch, DiT,
gfdit generate with the hub ids (from an offline hub cache)."""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
import os
import signal
import subprocess
import sys
import textwrap

import aiohttp
import numpy as np
import openai
import pytest
from PIL import Image

from engine.async_engine import AsyncEngine
from engine.models.loader import load_adapter
from engine.params import ImageParams, Limits
from entrypoints.batch import run_batch
from entrypoints.offline import DiT
from tests.helpers import pipeline_reference

pytestmark = pytest.mark.timeout(300)

LONG = " ".join(["fox"] * 600)  # past both families' 512 tokens
# (preset, good request, [(bad fields, the param the 400 names)])
CASES = [
    ("tiny-qwen-image", {"negative_prompt": "", "true_cfg_scale": 3.0}, [
        ({"true_cfg_scale": 0.5}, "true_cfg_scale"), ({"true_cfg_scale": 101}, "true_cfg_scale"),
        ({"size": "72x64"}, "size"), ({"size": "64x40"}, "size"), ({"prompt": LONG}, "prompt"),
        ({"negative_prompt": LONG}, "negative_prompt"), ({"prompt": LONG, "stream": True}, "prompt"),
    ]),
    ("tiny-z-image", {"negative_prompt": "blurry", "guidance_scale": 3.0, "cfg_truncation": 0.6,
                      "cfg_normalization": 1.1}, [
        ({"cfg_truncation": 1.5}, "cfg_truncation"), ({"cfg_normalization": -1}, "cfg_normalization"),
        ({"size": "64x56"}, "size"), ({"prompt": LONG}, "prompt"), ({"negative_prompt": LONG}, "negative_prompt"),
        # Z-Image's rows are not yet assigned LoRA per row: refused, never silently ignored.
        ({"loras": [{"name": "ink"}]}, "loras"),
    ]),
]


@functools.cache
def model_info(preset: str):
    return load_adapter(preset, device="cpu").info()


def reference(preset_pipelines, preset: str, prompt: str, **fields) -> np.ndarray:
    """The plain pipeline's pixels for the request, its defaults resolved as the engine does."""
    params = ImageParams(width=64, height=64, **fields).resolve(model_info(preset), Limits())
    return pipeline_reference(preset_pipelines(preset), prompt, params)[1]


def assert_close(pixels: np.ndarray, ref: np.ndarray) -> None:
    assert pixels.shape == ref.shape
    assert np.abs(pixels.astype(int) - ref.astype(int)).max() <= 1


@pytest.mark.parametrize("preset, good, bad", CASES, ids=[c[0] for c in CASES])
async def test_bad_input_gets_a_400_naming_the_field_and_good_input_the_pipeline_image(
        preset, good, bad, make_server, preset_pipelines):
    server = make_server(model=preset)
    async with aiohttp.ClientSession() as session:
        for fields, param in bad:
            body = {"prompt": "a red fox", "size": "64x64", "num_inference_steps": 2, **fields}
            async with session.post(server.url + "/v1/images/generations", json=body) as response:
                answer = await response.json()
                assert response.status == 400, (fields, answer)
            assert answer["error"]["param"] == param, (fields, answer)
            assert answer["error"]["type"] == "invalid_request_error"
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    result = await client.images.generate(model=preset, prompt="a red fox", size="64x64",
                                          extra_body={"num_inference_steps": 3, "seed": 4, **good})
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).convert("RGB"))
    assert_close(pixels, reference(preset_pipelines, preset, "a red fox", num_inference_steps=3, seed=4, **good)[0])
    assert server.metric("gfdit_requests_total", {"outcome": "rejected"}) == len(bad)
    assert server.metric("gfdit_requests_total", {"outcome": "finished"}) == 1


async def test_gfdit_batch_runs_z_image_lines_with_their_own_cfg_options(tmp_path, preset_pipelines):
    lines = [
        {"id": "plain", "prompt": "a blue cat", "size": 64, "steps": 3, "seed": 1},
        {"id": "truncated", "prompt": "a red fox in the snow at night", "size": 64, "steps": 3, "seed": 2,
         "guidance": 2.0, "cfg_truncation": 0.4, "negative_prompt": "dark"},
        {"id": "unguided", "prompt": "tree", "size": 64, "steps": 2, "seed": 3, "guidance": 0.0},
        {"id": "too-long", "prompt": LONG, "size": 64, "steps": 2},
    ]
    engine = await AsyncEngine.create(model="tiny-z-image", device="cpu", executor="inprocess")
    try:
        stats = await run_batch([json.dumps(line) for line in lines], tmp_path, engine=engine)
    finally:
        await engine.shutdown()
    assert stats.done == 3 and len(stats.errors) == 1
    assert "too-long" in stats.errors[0] and "tokens" in stats.errors[0]
    for line in lines[:3]:
        fields = {"num_inference_steps": line["steps"], "seed": line["seed"]}
        fields.update({k: line[k] for k in ("cfg_truncation", "negative_prompt") if k in line})
        if "guidance" in line:
            fields["guidance_scale"] = line["guidance"]
        pixels = np.asarray(Image.open(tmp_path / f"{line['id']}_0.png").convert("RGB"))
        assert_close(pixels, reference(preset_pipelines, "tiny-z-image", line["prompt"], **fields)[0])


def test_dit_generates_qwen_image_batches_with_and_without_true_cfg(preset_pipelines):
    prompts = ["a red fox", "a castle over the sea at night with many stars", "tree"]
    fields = [dict(seed=1, negative_prompt=""), dict(seed=2, true_cfg_scale=2.0, negative_prompt="blurry"),
              dict(seed=3)]
    with DiT(model="tiny-qwen-image", device="cpu", executor="inprocess") as dit:
        outputs = dit.generate(prompts, [ImageParams(width=64, height=64, num_inference_steps=3, output_format="raw",
                                                     **f) for f in fields], use_tqdm=False)
    for out, prompt, f in zip(outputs, prompts, fields):
        ref = reference(preset_pipelines, "tiny-qwen-image", prompt, num_inference_steps=3, **f)
        assert_close(np.asarray(out.images[0].convert("RGB"))[None], ref)


def test_gfdit_generate_loads_the_hub_ids_as_qwen_image(tmp_path, preset_pipelines):
    """Both hub ids resolve, through an offline hub cache, to QwenImagePipeline folders."""
    cache = tmp_path / "hub"
    for repo in ("Qwen/Qwen-Image", "Qwen/Qwen-Image-2512"):
        snapshot = cache / ("models--" + repo.replace("/", "--")) / "snapshots" / ("0" * 40)
        preset_pipelines("tiny-qwen-image").save_pretrained(snapshot)
        (snapshot.parent.parent / "refs").mkdir()
        (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    target = tmp_path / "fox.png"
    script = textwrap.dedent(f"""
        from engine.models.loader import load_adapter
        from entrypoints.cli import main
        print("family", load_adapter("Qwen/Qwen-Image", device="cpu").info().family)
        raise SystemExit(main(["generate", "a red fox", "--model", "Qwen/Qwen-Image-2512", "--size", "64",
                               "--steps", "2", "--seed", "5", "--negative-prompt", "", "--true-cfg-scale", "2.5",
                               "--executor", "inprocess", "-o", {str(target)!r}]))
    """)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr
    assert "family qwen-image" in result.stdout and "seed 5" in result.stdout
    ref = reference(preset_pipelines, "tiny-qwen-image", "a red fox", num_inference_steps=2, seed=5,
                    negative_prompt="", true_cfg_scale=2.5)
    assert_close(np.asarray(Image.open(target).convert("RGB"))[None], ref)


@pytest.mark.slow
async def test_gfdit_serve_on_two_worker_processes_serves_z_image_and_exits_0_on_sigterm(preset_pipelines):
    from tests.entrypoints.test_cli_serve import post, start_server

    proc, url = await start_server("tiny-z-image", "--device", "cpu", "--num-workers", "2")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=240)) as session:
            bodies = [{"prompt": p, "size": "64x64", "num_inference_steps": 3, "seed": i, "cfg_truncation": 0.5}
                      for i, p in enumerate(["a red fox", "a castle over the sea at night"])]
            answers = await asyncio.gather(*(post(session, url, body) for body in bodies))
        for (status, answer), body in zip(answers, bodies):
            assert status == 200, answer
            pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["data"][0]["b64_json"]))).convert("RGB"))
            assert_close(pixels, reference(preset_pipelines, "tiny-z-image", body["prompt"], num_inference_steps=3,
                                           seed=body["seed"], cfg_truncation=0.5)[0])
        proc.proc.send_signal(signal.SIGTERM)
        assert await proc.wait(60) == 0, proc.output
    finally:
        await proc.kill()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny-qwen-image", "tiny-z-image"])
def test_gfdit_profile_measures_both_degrees_on_two_workers(preset, tmp_path):
    from engine.scheduler.cost_model import CostModel

    target = tmp_path / "profile.json"
    out = subprocess.run([sys.executable, "-m", "entrypoints.cli", "profile", preset, "--sizes", "64",
                          "--batch-sizes", "1,2", "--cycles", "1", "--steps", "1", "--num-workers", "2",
                          "--degrees", "1,2", "-o", str(target)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    cost_model = CostModel.load(target)
    assert cost_model.degrees == (1, 2) and cost_model.profile.migration.measured
    assert cost_model.step_s(cost_model.tokens(64, 64), 1, 2) > 0
