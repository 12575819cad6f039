"""The training command runs end to end in a few steps, writes a loadable model and resumes."""

import json

import torch
from diffusers import DiffusionPipeline, PixArtSigmaPipeline

from engine.models.shapes import train

TINY_RUN = ["--vae-steps", "2", "--vae-batch", "2", "--scenes", "16", "--batch", "4", "--eval-every", "5",
            "--probe", "2", "--final-eval", "0"]


def test_five_training_steps_write_a_stock_pipeline_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--out", str(out), "--steps", "5", *TINY_RUN]) == 0
    for name in ("vae.pt", "latents.pt", "dit.pt", "best/model_index.json", "last/model_index.json"):
        assert (out / name).exists(), name
    assert json.loads((out / "best" / "training.json").read_text())["step"] == 5
    pipe = DiffusionPipeline.from_pretrained(out / "last", dtype=torch.float32)
    assert isinstance(pipe, PixArtSigmaPipeline)
    assert pipe.transformer.dtype == torch.float32
    image = pipe("a red circle on a blue background", num_inference_steps=2, height=64, width=64,
                 use_resolution_binning=False, clean_caption=False).images[0]
    assert image.size == (64, 64)

    # Resuming: the saved step count carries on (7 = 5 saved + 2 more), nothing restarts.
    capsys.readouterr()
    assert train.main(["--out", str(out), "--steps", "7", *TINY_RUN]) == 0
    assert torch.load(out / "dit.pt", weights_only=False)["step"] == 7
    assert "vae step" not in capsys.readouterr().out
