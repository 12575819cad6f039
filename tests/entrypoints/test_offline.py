"""The DiT Python API (like vllm.LLM) over the same engine."""

import numpy as np
import pytest
from PIL import Image

from engine import ImageParams, InvalidParamsError
from entrypoints import DiT
from tests.helpers import pipeline_reference


@pytest.fixture(scope="module")
def dit():
    with DiT(model="tiny-sd3", device="cpu", max_batch_size=8) as dit:
        yield dit


def test_generate_returns_pil_images_in_prompt_order(dit, preset_pipelines):
    prompts = ["a red fox", "a blue cat", "a green tree"]
    params = [ImageParams(seed=s, num_inference_steps=3 + s, width=64, height=64 + 64 * (s % 2)) for s in range(3)]
    outputs = dit.generate(prompts, params, use_tqdm=False)
    assert [o.prompt for o in outputs] == prompts
    for out, p in zip(outputs, params):
        assert out.seed == p.seed
        assert isinstance(out.images[0], Image.Image) and out.images[0].size == (p.width, p.height)
        assert out.metrics.latency > 0
    ref_latents, ref_pixels = pipeline_reference(preset_pipelines("tiny-sd3"), prompts[1], outputs[1].params)
    assert np.abs(np.asarray(outputs[1].images[0]).astype(int) - ref_pixels[0].astype(int)).max() <= 1


def test_one_prompt_and_n_images_save_to_numbered_files(dit, tmp_path):
    out, = dit.generate("a fox", ImageParams(n=2, num_inference_steps=2, width=64, height=64), use_tqdm=False)
    paths = out.save(tmp_path / "fox.png")
    assert [p.name for p in paths] == ["fox_0.png", "fox_1.png"]
    assert Image.open(paths[0]).size == (64, 64)


def test_a_bad_request_fails_before_anything_runs(dit):
    with pytest.raises(InvalidParamsError, match="request 1") as info:
        dit.generate(["ok", "bad"], [ImageParams(num_inference_steps=2), ImageParams(width=63)], use_tqdm=False)
    assert info.value.param == "width"
    assert dit.engine.num_unfinished == 0
    with pytest.raises(InvalidParamsError, match="2 prompts but 1 params"):
        dit.generate(["a", "b"], [ImageParams()], use_tqdm=False)


def test_unknown_engine_option_is_named():
    with pytest.raises(TypeError, match="max_bach_size"):
        DiT(model="tiny-sd3", max_bach_size=3)


def test_use_tqdm_shows_a_bar_counting_images(dit, capsys):
    dit.generate(["a fox", "a cat"], ImageParams(n=2, num_inference_steps=1, width=64, height=64))
    err = capsys.readouterr().err
    assert "images: 100%" in err and "4/4" in err
    dit.generate("a fox", ImageParams(num_inference_steps=1, width=64, height=64), use_tqdm=False)
    assert "images" not in capsys.readouterr().err
