"""The Qwen-Image and Z-Image presets: real pipelines, tokenizers that template like the real ones."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from engine.models.presets import build_preset

QWEN_FAMILY_PRESETS = ["tiny-qwen-image", "tiny-z-image"]
CALL = {"tiny-qwen-image": dict(true_cfg_scale=4.0, negative_prompt=""), "tiny-z-image": dict(guidance_scale=5.0)}


def test_the_qwen_image_template_prefix_is_the_tokens_the_pipeline_drops(preset_pipelines):
    pipe = preset_pipelines("tiny-qwen-image")
    prefix, suffix = pipe.prompt_template_encode.split("{}")
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    ids = pipe.tokenizer(pipe.prompt_template_encode.format("a red fox")).input_ids
    assert ids[34:] == pipe.tokenizer("a red fox" + suffix).input_ids
    assert pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer("a red fox").input_ids) == ["a", "Ġred", "Ġfox"]


def test_z_image_renders_qwen3s_chat_template(preset_pipelines):
    tokenizer = preset_pipelines("tiny-z-image").tokenizer
    text = tokenizer.apply_chat_template([{"role": "user", "content": "a fox"}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True)
    assert text == "<|im_start|>user\na fox<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids)[:3] == ["<|im_start|>", "user", "Ċ"]


@pytest.mark.parametrize("name", QWEN_FAMILY_PRESETS)
def test_builds_are_deterministic_and_in_eval_mode(name, preset_pipelines):
    a, b = preset_pipelines(name), build_preset(name)
    for component in b.components.values():
        if isinstance(component, torch.nn.Module):
            assert not component.training, f"{name}: {type(component).__name__} in train mode"
    for key in ("transformer", "text_encoder", "vae"):
        for (param, pa), pb in zip(a.components[key].state_dict().items(), b.components[key].state_dict().values()):
            assert torch.equal(pa, pb), f"{name}: {key}.{param} differs between builds"


@pytest.mark.parametrize("name", QWEN_FAMILY_PRESETS)
def test_saved_and_reloaded_offline_the_pipeline_makes_the_same_image(name, preset_pipelines, tmp_path):
    pipe = preset_pipelines(name)
    pipe.save_pretrained(tmp_path / name)
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / name)
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded) is type(pipe)

    def image(p):
        return p("a red fox in the forest", height=64, width=64, num_inference_steps=3,
                 generator=torch.Generator().manual_seed(1), output_type="np", **CALL[name]).images

    for key in ("transformer", "text_encoder", "vae"):
        reloaded_state = reloaded.components[key].state_dict()
        assert all(torch.equal(v, reloaded_state[k]) for k, v in pipe.components[key].state_dict().items())
    before, after = image(pipe), image(reloaded)
    assert before.shape == (1, 64, 64, 3) and before.std() > 0.01
    # Equal weights, but loaded at another alignment: CPU kernels may round the last bit differently.
    assert np.abs(before - after).max() <= 1e-5
    assert np.abs((before * 255).round() - (after * 255).round()).max() <= 1
