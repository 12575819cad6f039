"""Predicted stage times, fitted from a profile; what cost-aware policies and the simulator use.

For each stage and degree the model is

    time(t, B) = a + p*B + b*B*t + c*B*t^2      (t image tokens per sample, B images)

with a >= 0 a per-task cost (kernel launches, synchronisation, collective latency), p a
per-image cost (text encoding), b the work linear in tokens (projections, MLPs) and c
attention. Batch scaling assumption: a batch of B images costs B times the per-image
work plus the per-task cost once, so batching pays exactly as much as the fixed cost a
is large next to the work; where a profile measures several batch sizes the fit learns
that from the data, and where it measures batch 1 only (the H20 figures) an unexplained
constant is read as a per-task cost.

The fit is least squares in relative error over the subsets of terms that the points
determine (full column rank) and that come out non-negative; the best fit wins, and among
fits equally good (two points fit any two terms exactly) the one with the linear token
term wins, then the one with more terms, then the order above. So at degree 1 the H20
points (155 ms at 1024 tokens, 1557 ms at 9216: slightly worse than linear) give
b*t + c*t^2 with no fixed cost, and at degrees 2 and 4 (161 -> 880, 172 -> 464: a large
constant) they give a + b*t.

ENCODE and DECODE do not split across a group, so their time does not depend on the
degree (degree-1 points); a stage with no points costs nothing. Denoise degrees that the
profile does not cover are not predicted: ``degrees`` lists those it does.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from engine.messages import Stage
from engine.scheduler.profile import MigrationSpec, Point, Profile, ProfileError

# (name, feature(tokens, batch)) in preference order.
TERMS: tuple[tuple[str, object], ...] = (
    ("fixed", lambda t, b: 1.0),
    ("per_image", lambda t, b: float(b)),
    ("per_token", lambda t, b: float(b * t)),
    ("attention", lambda t, b: float(b * t * t)),
)
_TOKEN_TERM = 2
_TIE = 1e-6  # relative squared error below which two fits count as equally good
# A step-cached image-step runs the first of a DiT's 12-57 blocks plus the step's own work
# (the scheduler step, embeddings, the output layer); this share of a computed step's
# per-image work is used until a profile measures its own (``cached_step_cost``).
DEFAULT_CACHED_STEP_COST = 0.1


@dataclass(frozen=True)
class Fit:
    """Coefficients in milliseconds for the terms in TERMS order."""

    coef: tuple[float, float, float, float]
    rel_rms: float  # root mean square relative error over the points

    def ms(self, tokens: int, batch: int) -> float:
        a, p, b, c = self.coef
        return a + batch * (p + tokens * (b + c * tokens))


def fit_points(points: Sequence[tuple[int, int, float]]) -> Fit:
    """Fit (tokens, batch, ms) points; see the module docstring for the rule."""
    if not points:
        raise ProfileError("no points to fit")
    best: tuple[tuple, Fit] | None = None
    for size in range(len(TERMS), 0, -1):
        for subset in itertools.combinations(range(len(TERMS)), size):
            solved = _solve(points, subset)
            if solved is None:
                continue
            coef, score = solved
            fit = Fit(coef, (score / len(points)) ** 0.5)
            # Lower is better: score (rounded to the tie tolerance), token term, size, order.
            key = (round(score / _TIE), _TOKEN_TERM not in subset, -size, subset)
            if best is None or key < best[0]:
                best = (key, fit)
    if best is None:
        raise ProfileError(f"no non-negative fit for points {list(points)}")
    return best[1]


def _solve(points: Sequence[tuple[int, int, float]], subset: tuple[int, ...]
           ) -> tuple[tuple[float, float, float, float], float] | None:
    """Weighted least squares on the chosen terms; None if rank-deficient or negative."""
    rows = [[TERMS[j][1](t, b) / ms for j in subset] for t, b, ms in points]  # type: ignore[operator]
    k = len(subset)
    scale = [max(abs(r[j]) for r in rows) or 1.0 for j in range(k)]
    rows = [[r[j] / scale[j] for j in range(k)] for r in rows]
    gram = [[sum(r[i] * r[j] for r in rows) for j in range(k)] + [sum(r[i] for r in rows)] for i in range(k)]
    for col in range(k):  # Gauss-Jordan with partial pivoting on the augmented Gram matrix
        pivot = max(range(col, k), key=lambda i: abs(gram[i][col]))
        if abs(gram[pivot][col]) < 1e-10 * len(points):
            return None
        gram[col], gram[pivot] = gram[pivot], gram[col]
        for i in range(k):
            if i != col:
                f = gram[i][col] / gram[col][col]
                gram[i] = [x - f * y for x, y in zip(gram[i], gram[col])]
    x = [gram[i][k] / gram[i][i] for i in range(k)]
    if any(v < -1e-12 for v in x):
        return None
    score = sum((sum(r[j] * x[j] for j in range(k)) - 1.0) ** 2 for r in rows)
    coef = [0.0] * len(TERMS)
    for j, term in enumerate(subset):
        coef[term] = max(0.0, x[j] / scale[j])
    return (coef[0], coef[1], coef[2], coef[3]), score


class CostModel:
    """Predicted seconds for a stage of a batch on a group; pure and cheap (memoised)."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.size_multiple = profile.size_multiple
        self.default_steps = profile.default_steps
        self.migration = profile.migration
        self._fits: dict[tuple[str, int], Fit] = {}
        groups: dict[tuple[str, int], list[Point]] = {}
        for p in profile.points:
            groups.setdefault((p.stage, p.degree if p.stage == "denoise" else 1), []).append(p)
        for key, pts in groups.items():
            self._fits[key] = fit_points([(profile.tokens(p.width, p.height), p.batch, p.ms) for p in pts])
        self._degrees = tuple(sorted(d for s, d in self._fits if s == "denoise"))
        self._cache: dict[tuple[int, int, int, int], float] = {}

    @classmethod
    def load(cls, spec: str | Path) -> CostModel:
        return cls(Profile.load(spec))

    @property
    def degrees(self) -> tuple[int, ...]:
        """Denoise degrees the profile covers."""
        return self._degrees

    def fit(self, stage: str, degree: int = 1) -> Fit | None:
        return self._fits.get((stage, degree))

    def tokens(self, width: int, height: int) -> int:
        return self.profile.tokens(width, height)

    def stage_s(self, stage: Stage, tokens: int, batch: int, degree: int = 1) -> float:
        """Seconds for one task of ``stage`` (one step for DENOISE) over ``batch`` images."""
        key = (int(stage), tokens, batch, degree)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        name = stage.name.lower()
        fit = self._fits.get((name, degree if stage == Stage.DENOISE else 1))
        if fit is None:
            if stage == Stage.DENOISE:
                raise ProfileError(f"profile {self.profile.model!r} has no denoise figures at degree {degree}; "
                                   f"it covers {self._degrees}")
            value = 0.0
        else:
            value = fit.ms(tokens, batch) / 1e3
        self._cache[key] = value
        return value

    @property
    def cached_step_cost(self) -> float:
        cost = self.profile.cached_step_cost
        return DEFAULT_CACHED_STEP_COST if cost is None else cost

    def step_s(self, tokens: int, batch: int = 1, degree: int = 1, lora: bool = False, cached: float = 0.0) -> float:
        """One denoise step; ``lora``: the images run LoRA rows, whose low-rank matmuls add
        the profile's ``lora_overhead`` to the per-image work (not to the per-task cost);
        ``cached``: the share of the images expected to reuse their step cache, whose
        per-image work is ``cached_step_cost`` of a computed one (per-row accounting)."""
        seconds = self.stage_s(Stage.DENOISE, tokens, batch, degree)
        if (lora and self.profile.lora_overhead) or cached:
            fixed = self._fits[("denoise", degree)].coef[0] / 1e3
            work = seconds - fixed
            if lora:
                work *= 1 + self.profile.lora_overhead
            seconds = fixed + work * (1 - cached * (1 - self.cached_step_cost))
        return seconds

    def migration_s(self, tokens: int, images: int = 1) -> float:
        return self.migration.cost_ms(tokens, images) / 1e3

    def request_s(self, tokens: int, steps: int, images: int = 1, degree: int = 1) -> float:
        """A request alone from encode to decode at one degree, without migrations."""
        return (self.stage_s(Stage.ENCODE, tokens, images) + steps * self.step_s(tokens, images, degree)
                + self.stage_s(Stage.DECODE, tokens, images))

    def fastest_degree(self, tokens: int, images: int, allowed: Sequence[int]) -> int:
        """The degree (among ``allowed`` that the profile covers) with the shortest step."""
        usable = [d for d in allowed if d in self._degrees] or [1]
        return min(usable, key=lambda d: (self.step_s(tokens, images, d), d))

    def with_migration(self, latency_ms: float) -> CostModel:
        """The same model with a flat cost per migration (the simulator's --migration-ms)."""
        return CostModel(replace(self.profile, migration=MigrationSpec(latency_ms=latency_ms, measured=False)))

    def describe(self) -> list[str]:
        """One line per fit, for logs and ``gfdit simulate``."""
        lines = []
        for (stage, degree), fit in sorted(self._fits.items()):
            a, p, b, c = fit.coef
            lines.append(f"{stage} d={degree}: {a:.3g} + {p:.3g}*B + {b:.3g}*B*t + {c:.3g}*B*t^2 ms "
                         f"(fit rms {fit.rel_rms:.1%})")
        return lines
