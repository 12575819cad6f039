"""Engine configuration: frozen dataclasses, one per concern, and their CLI flags.

``EngineConfig.create(**options)`` takes the flat keyword options that ``DiT(...)`` and the
CLI use (``model=``, ``max_batch_size=``, ``num_workers=`` ...) and sorts them into the
sub-configs, so every front end shares one set of names.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from engine.params import Limits, StepCache

# The built-in preset used when no model is named (see engine/models/presets.py).
DEFAULT_MODEL = "shapes"


@dataclass(frozen=True)
class ModelConfig:
    model: str = DEFAULT_MODEL
    """A preset name (shapes, tiny-pixart, small-pixart, tiny-sd3, tiny-flux), a diffusers folder or a hub id."""
    device: str = "auto"
    """auto (cuda when present), cpu, or cuda."""
    dtype: str = "auto"
    """auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16 or float16."""
    attention_backend: str = "auto"
    """auto, sdpa or xformers (xformers only where CUDA and a matching build exist)."""
    backend: str = "auto"
    """auto (a native adapter where the family has one, else the whole diffusers pipeline per request) or diffusers (always the whole pipeline: no step batching, no sequence parallelism)."""
    compile: bool = False
    """torch.compile (inductor) the transformer's repeated blocks; the first steps at a new batch layout or image size pay the compile, logged."""
    cache: str | None = None
    """Step cache of requests that name none: fbcache:THRESHOLD[:MAX_CACHED_STEPS] (e.g. fbcache:0.3) or none; a request's own cache wins. Ignored for models without a step cache."""

    def __post_init__(self) -> None:
        if self.cache:  # a bad --cache fails at start, naming the flag's format
            StepCache.parse(self.cache)

    @property
    def step_cache(self) -> StepCache | None:
        return StepCache.parse(self.cache) if self.cache else None


@dataclass(frozen=True)
class SchedulerConfig:
    policy: str = "fcfs"
    """fcfs, srtf, static, edf, elastic, or module:Class."""
    profile: str | None = None
    """Cost-model profile for edf/elastic: a shipped name or a JSON from `gfdit profile`; None: the shipped one for the model, if any."""
    max_batch_size: int | None = None
    """Most images in one denoise (or decode) batch; None: 8 on CPU (larger batches fall out of its caches), 16 on GPU."""
    max_batch_tokens: int | None = None
    """Most image-token rows (images x tokens, x2 with CFG, / degree) a worker computes in one denoise batch; None: 2048 on CPU (a bigger batch no longer runs faster per image there, measured), no cap on GPU."""
    steps_per_task: int = 1
    """Denoise steps a task runs before the scheduler decides again."""
    static_degree: int = 1
    """Sequence-parallel degree of the static policy."""
    max_retries: int = 1
    """Times a request starts over after its worker died, before it fails."""


@dataclass(frozen=True)
class ParallelConfig:
    num_workers: int | None = None
    """Worker processes (one per device); None: one per GPU, or 1 on CPU."""
    executor: str = "auto"
    """auto (= multiprocess), multiprocess (a worker process per device) or inprocess (one worker on a thread)."""
    worker_threads: int | None = None
    """torch threads per CPU worker; None: 1 with several workers, else torch's default."""


@dataclass(frozen=True)
class TelemetryConfig:
    telemetry_period_s: float = 0.2
    """Seconds between GPU telemetry (NVML) samples that shape placement and memory admission; 0 turns telemetry off."""
    detect_foreign_processes: bool = True
    """Count other programs' processes on our GPUs as foreign (their ranks are avoided for groups and derated); --no-detect-foreign-processes where NVML's pids cannot be matched to ours (some containers)."""


@dataclass(frozen=True)
class LoraConfig:
    lora: tuple[str, ...] = ()
    """A LoRA adapter NAME=PATH (a diffusers/PEFT .safetensors file, or a folder with one) loaded on every worker at start-up; repeatable. PATH is relative to --lora-dir."""
    lora_dir: str | None = None
    """The folder adapters are loaded from (start-up and POST /v1/loras); paths may not leave it. None: the working directory."""
    max_loras: int = 8
    """Most LoRA adapters resident at once; loading one more unloads the least recently used one no live request uses."""


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def create(cls, **options: Any) -> EngineConfig:
        """Build from flat options; unknown names raise TypeError naming them."""
        parts: dict[str, dict[str, Any]] = {"model": {}, "scheduler": {}, "parallel": {}, "telemetry": {},
                                            "lora": {}, "limits": {}}
        owners = _option_owners()
        unknown = []
        for name, value in options.items():
            if name not in owners:
                unknown.append(name)
            elif value is not None:
                parts[owners[name]][name] = value
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(sorted(unknown))}; "
                            f"known: {', '.join(sorted(owners))}")
        return cls(
            model=ModelConfig(**parts["model"]),
            scheduler=SchedulerConfig(**parts["scheduler"]),
            parallel=ParallelConfig(**parts["parallel"]),
            telemetry=TelemetryConfig(**parts["telemetry"]),
            lora=LoraConfig(**{k: tuple(v) if k == "lora" else v for k, v in parts["lora"].items()}),
            limits=Limits(**parts["limits"]),
        )


_SECTIONS = {"model": ModelConfig, "scheduler": SchedulerConfig, "parallel": ParallelConfig,
             "telemetry": TelemetryConfig, "lora": LoraConfig}
_LIMIT_FIELDS = ("max_n", "max_size", "max_steps", "max_prompt_chars", "max_loras_per_request")
_LIMIT_HELP = {
    "max_n": "Most images one request may ask for.",
    "max_size": "Largest width or height a request may ask for, in pixels.",
    "max_steps": "Most denoising steps a request may ask for.",
    "max_prompt_chars": "Longest prompt (and negative prompt) a request may give, in characters.",
    "max_loras_per_request": "Most LoRA adapters one request may name.",
}


def _option_owners() -> dict[str, str]:
    owners = {f.name: section for section, cls in _SECTIONS.items() for f in dataclasses.fields(cls)}
    owners.update(dict.fromkeys(_LIMIT_FIELDS, "limits"))
    return owners


def add_engine_args(parser: argparse.ArgumentParser, *, with_model: bool = True) -> None:
    """Add ``--flag`` for every engine option (the model too unless the command takes it positionally)."""
    group = parser.add_argument_group("engine")
    for cls in _SECTIONS.values():
        for f in dataclasses.fields(cls):
            if f.name == "model" and not with_model:
                continue
            flag = "--" + f.name.replace("_", "-")
            if "tuple" in str(f.type):
                group.add_argument(flag, dest=f.name, action="append", default=None, help=_doc(cls, f.name))
                continue
            default = f.default
            if str(f.type) in ("bool", "<class 'bool'>"):
                group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                   help=f"{_doc(cls, f.name)} (default: {'on' if default else 'off'})")
                continue
            kind = int if "int" in str(f.type) else float if "float" in str(f.type) else str
            group.add_argument(flag, dest=f.name, type=kind, default=None,
                               help=f"{_doc(cls, f.name)} (default: {default})")
    for name in _LIMIT_FIELDS:
        group.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None,
                           help=f"{_LIMIT_HELP[name]} (default: {getattr(Limits(), name)})")


def engine_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    names = _option_owners()
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def _doc(cls: type, name: str) -> str:
    """The docstring under a dataclass field, so --help and the code say the same thing."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and node.target.id == name and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)):
            return str(nxt.value.value)
    return name
