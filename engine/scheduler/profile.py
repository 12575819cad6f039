"""A cost-model profile: measured stage times of one model on one kind of device, as JSON.

The scheduler's cost model is fitted from a profile, so a profile holds measurements,
not coefficients: ``gfdit profile MODEL`` writes one from the current machine, and a
profile can be written by hand from published figures (the shipped H20 one is). Shipped
profiles live in ``engine/scheduler/profiles/`` and load by name.

Schema (``"schema": 1``)::

    {
      "schema": 1,
      "model": "small-pixart",        # what was measured; the engine picks a shipped
                                      # profile whose model matches its own by default
      "family": "pixart",             # optional: the profile also serves by default every
                                      # model of this family (engine/models/registry.py)
      "device": "cpu (2 cores, 1 torch thread)",
      "source": "how the figures were obtained",
      "size_multiple": 16,            # pixels per token side (VAE factor x patch size):
                                      # tokens = (width / m) * (height / m)
      "default_steps": 20,            # the model's default denoising steps
      "points": [                     # one measured time per stage, size, batch, degree
        {"stage": "denoise", "width": 512, "height": 512, "batch": 1, "degree": 1,
         "ms": 155.0},                # denoise: one step; encode/decode: the whole task
        ...
      ],
      "migration": {                  # moving one request's state to other ranks:
        "latency_ms": 1.0,            #   latency + images * (per_image + per_token * tokens)
        "ms_per_image": 0.07,         #   (embeddings, scheduler state: size-independent)
        "ms_per_token": 1.3e-06,      #   (latents: bytes per token / bandwidth)
        "measured": false             # true when measured, false when estimated
      },
      "notes": ["free text", ...]
    }

``batch`` counts images; ``degree`` is the sequence-parallel group size. ENCODE and
DECODE points are taken at degree 1 (those stages do not split across a group).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.model_info import LatentSpec

SCHEMA_VERSION = 1
STAGES = ("encode", "denoise", "decode")
PROFILES_DIR = Path(__file__).with_name("profiles")


class ProfileError(ValueError):
    """A profile is missing, malformed, or lacks what a caller needs."""


@dataclass(frozen=True)
class Point:
    stage: str
    width: int
    height: int
    batch: int
    degree: int
    ms: float


@dataclass(frozen=True)
class MigrationSpec:
    """Time to move one request's state; a profile without it makes migrations free."""

    latency_ms: float = 0.0
    ms_per_image: float = 0.0
    ms_per_token: float = 0.0
    measured: bool = False

    def cost_ms(self, tokens: int, images: int) -> float:
        return self.latency_ms + images * (self.ms_per_image + self.ms_per_token * tokens)


@dataclass(frozen=True)
class Profile:
    model: str
    size_multiple: int
    default_steps: int
    points: tuple[Point, ...]
    device: str = ""
    source: str = ""
    migration: MigrationSpec = field(default_factory=MigrationSpec)
    notes: tuple[str, ...] = ()
    family: str = ""
    # How much a denoise step's per-image work grows for an image that runs LoRA rows (0.1:
    # 10% more); measured by benchmarks/benchmark_lora.py (its lora_overhead minus 1).
    lora_overhead: float = 0.0
    # The share of a computed step's per-image work that a step-cached image-step still
    # costs (its first block and the step's own work); measured by
    # benchmarks/benchmark_cache.py (its cached_step_cost). None: the cost model's default.
    cached_step_cost: float | None = None

    @property
    def latent(self) -> LatentSpec:
        """The measured model's token geometry, as far as the profile records it."""
        return LatentSpec(channels=1, spatial_compression=self.size_multiple, patch_size=1)

    def tokens(self, width: int, height: int) -> int:
        return self.latent.image_tokens(height, width)

    # ----- JSON --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        if not isinstance(data, dict):
            raise ProfileError("a profile is a JSON object")
        if data.get("schema") != SCHEMA_VERSION:
            raise ProfileError(f"profile schema {data.get('schema')!r} is not supported (expected {SCHEMA_VERSION})")
        try:
            points = tuple(_point(p) for p in data["points"])
            migration = MigrationSpec(**{k: v for k, v in data.get("migration", {}).items()})
            profile = cls(model=str(data["model"]), size_multiple=int(data["size_multiple"]),
                          default_steps=int(data["default_steps"]), points=points,
                          device=str(data.get("device", "")), source=str(data.get("source", "")),
                          migration=migration, notes=tuple(data.get("notes", ())),
                          family=str(data.get("family", "")),
                          lora_overhead=float(data.get("lora_overhead", 0.0)),
                          cached_step_cost=None if data.get("cached_step_cost") is None
                          else float(data["cached_step_cost"]))
        except (KeyError, TypeError) as exc:
            raise ProfileError(f"malformed profile: {exc!r}") from None
        if not 0.0 <= profile.lora_overhead <= 10.0:
            raise ProfileError(f"lora_overhead must be in [0, 10], got {profile.lora_overhead}")
        if profile.cached_step_cost is not None and not 0.0 <= profile.cached_step_cost <= 1.0:
            raise ProfileError(f"cached_step_cost must be in [0, 1], got {profile.cached_step_cost}")
        if profile.size_multiple < 1 or profile.default_steps < 1:
            raise ProfileError("size_multiple and default_steps must be >= 1")
        if not any(p.stage == "denoise" for p in points):
            raise ProfileError("a profile needs at least one denoise point")
        return profile

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION, "model": self.model, **({"family": self.family} if self.family else {}),
            "device": self.device, "source": self.source,
            "size_multiple": self.size_multiple, "default_steps": self.default_steps,
            "points": [asdict(p) for p in self.points],
            "migration": asdict(self.migration), "notes": list(self.notes), "lora_overhead": self.lora_overhead,
            **({"cached_step_cost": self.cached_step_cost} if self.cached_step_cost is not None else {}),
        }

    @classmethod
    def load(cls, spec: str | Path) -> Profile:
        """A shipped profile by name (``h20_qwen_image``) or a JSON file by path."""
        path = Path(spec)
        if path.suffix != ".json" and path.parent == Path("."):
            path = PROFILES_DIR / f"{spec}.json"
            if not path.exists():
                raise ProfileError(f"no shipped profile {spec!r}; shipped: {', '.join(shipped_profiles())}")
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise ProfileError(f"cannot read profile {path}: {exc}") from None
        except json.JSONDecodeError as exc:
            raise ProfileError(f"profile {path} is not JSON: {exc}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def shipped_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))


def shipped_profile_for(model: str, family: str | None = None) -> str | None:
    """The shipped profile measured on ``model``, else one that serves its ``family``."""
    profiles = {name: Profile.load(name) for name in shipped_profiles()}
    for name, profile in profiles.items():
        if profile.model == model:
            return name
    for name, profile in profiles.items():
        if family and profile.family == family:
            return name
    return None


def _point(data: dict[str, Any]) -> Point:
    point = Point(stage=str(data["stage"]), width=int(data["width"]), height=int(data["height"]),
                  batch=int(data.get("batch", 1)), degree=int(data.get("degree", 1)), ms=float(data["ms"]))
    if point.stage not in STAGES:
        raise ProfileError(f"unknown stage {point.stage!r} in a profile point; stages: {', '.join(STAGES)}")
    if min(point.width, point.height, point.batch, point.degree) < 1 or not point.ms > 0:
        raise ProfileError(f"profile point out of range: {data}")
    return point
