"""Test LoRA adapters made with peft, saved the way diffusers' trainers save them."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

from engine.models.lora_files import LORA_FILE
from engine.params import ImageParams
from tests.helpers import pipeline_reference

# Two adapters over different (overlapping) layers, at different ranks and alphas.
ADAPTERS = {
    "ink": dict(targets=["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"], r=4, alpha=8, seed=1),
    "glow": dict(targets=["to_k", "add_k_proj", "norm1.linear", "ff.net.0.proj", "proj_out"], r=2, alpha=2, seed=2),
}


def make_lora(pipe, folder: Path, targets: list[str], r: int, alpha: int, seed: int,
              magnitude: float = 0.2) -> Path:
    """Write a random adapter for ``pipe``'s transformer into ``folder``; returns the folder."""
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    model = inject_adapter_in_model(config, copy.deepcopy(pipe.transformer))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * magnitude)
    state = get_peft_model_state_dict(model)
    folder.mkdir(parents=True, exist_ok=True)
    metadata = config.to_dict()
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}
    save = getattr(type(pipe), "save_lora_weights", None)
    if save is not None:
        save(str(folder), transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata)
    else:  # PixArt: no LoRA mixin; the plain PEFT layout with diffusers' metadata key
        from safetensors.torch import save_file

        prefixed = {f"transformer.{k}": v.contiguous() for k, v in state.items()}
        packed = {f"transformer.{k}": v for k, v in metadata.items()}
        save_file(prefixed, str(folder / LORA_FILE),
                  metadata={"format": "pt", "lora_adapter_metadata": json.dumps(packed, default=str)})
    return folder


def make_adapters(pipe, root: Path) -> dict[str, Path]:
    return {name: make_lora(pipe, root / name, **spec) for name, spec in ADAPTERS.items()}


def lora_reference(pipe, prompt: str, params: ImageParams):
    """diffusers' own LoRA (not fused), the request's adapters at its scales, one request at a time."""
    if params.loras:
        pipe.enable_lora()
        pipe.set_adapters([r.name for r in params.loras], [r.scale for r in params.loras])
    else:
        pipe.disable_lora()
    return pipeline_reference(pipe, prompt, params)
