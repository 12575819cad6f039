"""Random-weight pipelines whose transformers have the real models' widths, for GPU checks.

    python benchmarks/scaled_models.py --family flux --layers 2 --single-layers 4 --out /tmp/flux-sized

A GPU machine reaches no hub, so the GPU tests and benchmarks cannot load PixArt-Sigma,
SD3 or FLUX. This builds each family's pipeline from its tiny preset (tokenizers, text
encoders, VAE) with a transformer of the real model's width, heads and head size
(PixArt-Sigma 16 x 72, SD3-medium 24 x 64, FLUX.1 24 x 128) and fewer layers, so the
transformer's kernels and its cost per layer are the real ones. The text encoders and the
VAE stay tiny: their cost is not what these checks measure. ``--out`` saves a diffusers
folder that the engine (``--model DIR``) and ``DiffusionPipeline.from_pretrained`` load.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    DiffusionPipeline,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
)

from engine.models.presets import build_preset  # noqa: E402

# The real models' layer counts, for the record of how far a scaled one is cut.
FULL_LAYERS = {"pixart": (28, 0), "sd3": (24, 0), "flux": (19, 38)}
PRESET_OF = {"pixart": "tiny-pixart", "sd3": "tiny-sd3", "flux": "tiny-flux"}


def scaled_transformer(family: str, layers: int, single_layers: int = 0) -> torch.nn.Module:
    """The family's transformer at the real width, on the current default device."""
    if family == "pixart":
        return PixArtTransformer2DModel(
            num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=layers,
            cross_attention_dim=16 * 72, caption_channels=32, sample_size=64, patch_size=2,
            use_additional_conditions=False)
    if family == "sd3":
        return SD3Transformer2DModel(
            sample_size=64, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=32, caption_projection_dim=24 * 64,
            pooled_projection_dim=64, out_channels=4, pos_embed_max_size=96)
    if family == "flux":
        return FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single_layers,
            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=32, pooled_projection_dim=32,
            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    raise ValueError(f"unknown family {family!r}; choose pixart, sd3 or flux")


def scaled_pipeline(family: str, layers: int, single_layers: int = 0, device: str = "cpu",
                    dtype: torch.dtype = torch.float32, seed: int = 0, tiny: bool = False) -> DiffusionPipeline:
    """The tiny preset's pipeline with a real-width transformer, built on ``device``
    (``tiny``: the preset's own width with these layer counts, for dry runs on a CPU)."""
    base = build_preset(PRESET_OF[family])
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        if device.startswith("cuda"):
            torch.cuda.manual_seed(seed)
        if tiny:
            counts = {"num_layers": layers, **({"num_single_layers": single_layers} if family == "flux" else {})}
            transformer = type(base.transformer).from_config({**base.transformer.config, **counts})
        else:
            transformer = scaled_transformer(family, layers, single_layers)
    pipe = type(base)(**{**base.components, "transformer": transformer})
    pipe.to(device=device, dtype=dtype)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameters(pipe: DiffusionPipeline) -> int:
    return sum(p.numel() for p in pipe.transformer.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FULL_LAYERS), default="flux")
    parser.add_argument("--layers", type=int, default=2, help="(double-stream) transformer blocks")
    parser.add_argument("--single-layers", type=int, default=4, help="FLUX single-stream blocks")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the weights are drawn (a GPU draws them far faster)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="saved dtype")
    parser.add_argument("--out", required=True, help="folder to save the diffusers pipeline to")
    parser.add_argument("--tiny", action="store_true", help="the preset's tiny width instead (dry runs)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    pipe = scaled_pipeline(args.family, args.layers, args.single_layers if args.family == "flux" else 0,
                           args.device, dtype, tiny=args.tiny)
    pipe.save_pretrained(args.out)
    full = FULL_LAYERS[args.family]
    print(f"saved {args.family} at {'tiny' if args.tiny else 'full'} width, {args.layers}+{args.single_layers if args.family == 'flux' else 0} "
          f"layers of {full[0]}+{full[1]}, {parameters(pipe) / 1e9:.2f}B transformer parameters, to {args.out}")


if __name__ == "__main__":
    main()
