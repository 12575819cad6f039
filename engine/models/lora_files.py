"""Reading a LoRA adapter file into per-module low-rank factors for one transformer.

The files are the ones a diffusers pipeline's ``load_lora_weights`` takes (a
``.safetensors`` file, or a folder holding one). The family's own pipeline class reads
them with its ``lora_state_dict``, so its key conversions (Kohya, XLabs and the other
trainers' layouts FLUX and SD3 accept) are diffusers' own; a pipeline class without one
(PixArt) takes the plain PEFT layout, ``transformer.<module>.lora_A.weight``.

Each module's scale is worked out as diffusers' ``load_lora_adapter`` configures PEFT:
``lora_alpha / r`` from the file's adapter metadata (with its rank and alpha patterns),
else from ``<module>.alpha`` entries, else 1 (alpha equal to the rank). Only transformer
weights on ``nn.Linear`` modules are taken; anything else is refused by name, because
applying part of an adapter would silently give another image.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

LORA_FILE = "pytorch_lora_weights.safetensors"
_PREFIX = "transformer."


class LoraFileError(ValueError):
    """The adapter file cannot be used with this model; the message says why."""


@dataclass(frozen=True)
class LoraFactors:
    """One module's ``delta = x @ down.T @ up.T * scale``."""

    down: torch.Tensor  # lora_A: (rank, in_features)
    up: torch.Tensor  # lora_B: (out_features, rank)
    scale: float


def adapter_file(path: str | Path) -> Path:
    """The ``.safetensors`` file of an adapter path (a file, or a folder with one)."""
    path = Path(path)
    if path.is_dir():
        files = [path / LORA_FILE] if (path / LORA_FILE).is_file() else sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise LoraFileError(f"{path} holds {len(files)} .safetensors files; name the adapter file")
        path = files[0]
    if not path.is_file():
        raise LoraFileError(f"no adapter file at {path}")
    if path.suffix != ".safetensors":
        raise LoraFileError(f"{path.name}: adapters are read from .safetensors files only (no pickles)")
    return path


def read_lora(path: str | Path, pipeline_class: type, transformer: nn.Module) -> dict[str, LoraFactors]:
    """Module name -> factors, in the transformer's dtype and device; raises LoraFileError."""
    file = adapter_file(path)
    try:
        state, alphas, metadata = _state_dict(file, pipeline_class)
    except LoraFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure is the file's fault
        raise LoraFileError(f"{file.name} is not a readable LoRA adapter: {type(exc).__name__}: {exc}") from exc
    other = sorted({k.split(".")[0] for k in state if not k.startswith(_PREFIX)})
    if other:
        raise LoraFileError(f"{file.name} has weights for {', '.join(other)}; only transformer LoRA weights "
                            "are supported")
    state = {k.removeprefix(_PREFIX): v for k, v in state.items()}
    if state and "lora_A" not in next(iter(state)):
        from diffusers.utils.peft_utils import convert_unet_state_dict_to_peft

        state = convert_unet_state_dict_to_peft(state)
    alphas = {k.removeprefix(_PREFIX): float(v) for k, v in (alphas or {}).items()}
    if metadata:
        metadata = {k.removeprefix(_PREFIX): v for k, v in metadata.items()}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key)
        if match is None:
            raise LoraFileError(f"{file.name}: unsupported LoRA entry {key!r} (DoRA, biases and other tuners "
                                "are not supported)")
        modules.setdefault(match.group(1), {})[match.group(2)] = tensor
    if not modules:
        raise LoraFileError(f"{file.name} has no transformer LoRA weights")
    weight = next(transformer.parameters())
    out = {}
    for name, parts in modules.items():
        if set(parts) != {"A", "B"}:
            raise LoraFileError(f"{file.name}: module {name} lacks lora_{'B' if 'A' in parts else 'A'}")
        try:
            module = transformer.get_submodule(name)
        except AttributeError:
            raise LoraFileError(f"{file.name}: the model has no module {name}") from None
        if not isinstance(module, nn.Linear):
            raise LoraFileError(f"{file.name}: module {name} is a {type(module).__name__}; LoRA applies to "
                                "Linear layers only")
        down, up = parts["A"], parts["B"]
        rank = down.shape[0]
        if (down.ndim != 2 or up.ndim != 2 or up.shape[1] != rank or down.shape[1] != module.in_features
                or up.shape[0] != module.out_features):
            raise LoraFileError(f"{file.name}: module {name} has factors {tuple(down.shape)} x {tuple(up.shape)}, "
                                f"which do not fit its {module.in_features} -> {module.out_features} layer")
        out[name] = LoraFactors(down.to(weight.device, weight.dtype).contiguous(),
                                up.to(weight.device, weight.dtype).contiguous(),
                                _scale(name, rank, alphas, metadata))
    return out


def _state_dict(file: Path, pipeline_class: type) -> tuple[dict[str, torch.Tensor], dict | None, dict | None]:
    fetch = getattr(pipeline_class, "lora_state_dict", None)
    if fetch is None:
        from diffusers.utils.state_dict_utils import _load_sft_state_dict_metadata
        from safetensors.torch import load_file

        state = load_file(str(file))
        alphas = {k.removesuffix(".alpha"): state.pop(k) for k in [k for k in state if k.endswith(".alpha")]}
        return state, alphas, _load_sft_state_dict_metadata(str(file))
    kwargs: dict[str, Any] = {"use_safetensors": True, "return_lora_metadata": True}
    with_alphas = "return_alphas" in inspect.signature(fetch).parameters
    if with_alphas:
        kwargs["return_alphas"] = True
    out = fetch(str(file), **kwargs)
    alphas = None
    if with_alphas:
        state, alphas, metadata = out
    else:
        state, metadata = out
    alphas = {k.removesuffix(".alpha"): v for k, v in (alphas or {}).items()}
    return dict(state), alphas, metadata


def _scale(name: str, rank: int, alphas: dict[str, float], metadata: dict | None) -> float:
    """``lora_alpha / r`` for one module, as the PEFT config diffusers builds would give it."""
    if metadata:
        r = _pattern(name, metadata.get("rank_pattern") or {}, metadata.get("r", rank))
        alpha = _pattern(name, metadata.get("alpha_pattern") or {}, metadata.get("lora_alpha", r))
        return float(alpha) / (math.sqrt(r) if metadata.get("use_rslora") else float(r))
    if name in alphas:
        return alphas[name] / rank
    if alphas:
        # One alpha for the whole file, as diffusers reads a single-valued alpha set.
        values = set(alphas.values())
        if len(values) == 1:
            return values.pop() / rank
    return 1.0


def _pattern(name: str, patterns: dict[str, Any], default: Any) -> Any:
    # PEFT's get_pattern_key: a key matches the module's full name or a dotted suffix of it.
    for key, value in patterns.items():
        if key.startswith("^"):
            if re.match(key.removeprefix("^").split(".lora_")[0] + "$", name):
                return value
        elif re.match(rf"(.*\.)?({re.escape(key)})$", name):
            return value
    return default
