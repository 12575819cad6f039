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


def load_reference_adapters(pipe, paths: dict[str, Path]) -> None:
    """Load the adapters into ``pipe`` the diffusers way: ``load_lora_weights``, or for a
    pipeline without a LoRA mixin (PixArt) peft's own injection into its transformer."""
    if hasattr(pipe, "load_lora_weights"):
        for name, path in paths.items():
            pipe.load_lora_weights(str(path), adapter_name=name)
        return
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    for name, path in paths.items():
        spec = ADAPTERS[name]
        config = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], target_modules=spec["targets"])
        inject_adapter_in_model(config, pipe.transformer, adapter_name=name)
        state = {k.removeprefix("transformer."): v for k, v in load_file(str(path / LORA_FILE)).items()}
        set_peft_model_state_dict(pipe.transformer, state, adapter_name=name)


def lora_reference(pipe, prompt: str, params: ImageParams):
    """diffusers' own LoRA (not fused), the request's adapters at its scales, one request at a time."""
    from diffusers.utils.peft_utils import set_adapter_layers, set_weights_and_activate_adapters

    names, weights = [r.name for r in params.loras], [r.scale for r in params.loras]
    if hasattr(pipe, "set_adapters"):
        if params.loras:
            pipe.enable_lora()
            pipe.set_adapters(names, weights)
        else:
            pipe.disable_lora()
    else:  # what set_adapters does, on the transformer itself
        set_adapter_layers(pipe.transformer, enabled=bool(params.loras))
        if params.loras:
            set_weights_and_activate_adapters(pipe.transformer, names, weights)
    return pipeline_reference(pipe, prompt, params)
