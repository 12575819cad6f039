import pytest
import torch
from diffusers import DiffusionPipeline

from engine.models.loader import ModelLoadError, adapter_for, load_adapter
from engine.models.presets import PRESETS, build_preset
from engine.request import ImageParams, Limits


def test_every_preset_builds_deterministically_in_eval_mode():
    for name in ["tiny-pixart", "tiny-sd3", "tiny-flux"]:
        a, b = build_preset(name), build_preset(name)
        for component in a.components.values():
            if isinstance(component, torch.nn.Module):
                assert not component.training, f"{name}: {type(component).__name__} in train mode"
        for (key, pa), pb in zip(a.transformer.state_dict().items(), b.transformer.state_dict().values()):
            assert torch.equal(pa, pb), f"{name}: {key} differs between builds"


def test_small_pixart_is_about_30m_parameters():
    pipe = build_preset("small-pixart")
    count = sum(p.numel() for p in pipe.transformer.parameters())
    assert 25e6 < count < 35e6
    assert pipe.transformer.config.num_attention_heads % 4 == 0


def test_tokenizers_split_prompts_into_words():
    pipe = build_preset("tiny-sd3")
    ids = pipe.tokenizer("a red fox").input_ids
    assert len(ids) == 5  # start, three words, end
    t5_ids = pipe.tokenizer_3("a red fox").input_ids
    assert len(t5_ids) == 4 and t5_ids[-1] == pipe.tokenizer_3.eos_token_id


def test_saved_preset_reloads_and_serves_the_same_images(tmp_path, preset_pipelines):
    """The real loading path: save_pretrained, then the engine loads the folder."""
    pipe = preset_pipelines("tiny-sd3")
    pipe.save_pretrained(tmp_path / "sd3")
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "sd3")
    assert type(reloaded).__name__ == "StableDiffusion3Pipeline"
    adapter = load_adapter(str(tmp_path / "sd3"), device="cpu")
    assert adapter.info().family == "sd3"
    params = ImageParams(seed=5, width=64, height=64, num_inference_steps=3).resolve(adapter.info(), Limits())
    (cond, uncond), = adapter.encode(["a red fox"], [params])
    state = adapter.prepare("r", params, cond, uncond)
    while not state.done:
        adapter.denoise([state])
    reference = pipe("a red fox", num_inference_steps=3, height=64, width=64, guidance_scale=params.guidance_scale,
                     generator=torch.Generator().manual_seed(5), output_type="latent").images
    assert (state.latents - reference).abs().max().item() <= 1e-5


def test_unknown_model_gives_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="could not load model") as info:
        load_adapter(str(tmp_path / "missing"), device="cpu")
    assert "tiny-pixart" in str(info.value)
    assert set(PRESETS) >= {"tiny-pixart", "small-pixart", "tiny-sd3", "tiny-flux"}


def test_unsupported_pipeline_class_is_refused():
    class NotADiT:
        pass

    with pytest.raises(ModelLoadError, match="not supported"):
        adapter_for(NotADiT())  # type: ignore[arg-type]
