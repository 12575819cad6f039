"""Per-request step caching on the built-in default model: thresholds swept against no cache.

    python benchmarks/benchmark_cache.py --json cache.json

The held-out prompts of ``shapes`` (--prompts, 16) are drawn through the engine (``DiT``,
the model's default steps and guidance, the same seeds) once without a cache and once per
threshold of --thresholds (``{"method": "fbcache", "threshold": T, "max_cached_steps": K}``
on every request), after one uncached warm-up run; --repeats rounds run every
configuration once each, and each one's fastest run counts. For each threshold:

- ``row_step_reduction``: transformer rows that ran the blocks after the first, uncached
  over cached (rows x steps; the first block runs on every row either way);
- ``wall_speedup``: the uncached run's wall time over the cached run's (all prompts
  submitted at once, encode and decode included);
- ``psnr_db``: mean PSNR of each image against its uncached image (capped at 100 dB);
- the model's accuracy read back by ``engine.models.shapes.evaluate`` (colour, background
  and shape; ``accuracy``, the prompt accuracy, is their mean), and its drop from
  uncached in points (``accuracy_drop_points``, negative when it rose).

The recommended threshold is the one with the greatest ``row_step_reduction`` whose PSNR
and accuracy stay within the targets (--recommend picks one instead). ``step_cost`` times
one adapter's denoise steps on a batch of --batch requests, every step computed against
every middle step cached: ``cached_step_cost`` is the fraction a cached step costs,
the figure a profile's ``cached_step_cost`` takes for the cost model.

JSON keys (--json PATH): model, prompts, steps, max_cached_steps, repeats, uncached
(wall_s, accuracy, color_accuracy, background_accuracy, shape_accuracy), sweep (one object
per threshold: threshold, wall_s, wall_speedup, row_step_reduction, cached_fraction,
psnr_db, accuracy and its parts, accuracy_drop_points), recommended (the same for the
recommended threshold, plus accuracy_uncached), targets, met (target -> bool), step_cost
(computed_ms, cached_ms, cached_step_cost, batch). A model other than ``shapes`` (the GPU
check's FLUX-sized one) gets every figure but the accuracy ones.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import print_table, write_json  # noqa: E402

TARGETS = {"row_step_reduction": 1.8, "wall_speedup": 1.5, "psnr_db": 28.0, "accuracy_drop_points": 3.0}
PSNR_CAP_DB = 100.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * math.log10(255.0**2 / mse))


def accuracy(scenes, images) -> dict[str, float]:
    from engine.models.shapes.evaluate import score

    s = score(scenes, images)
    parts = {"color_accuracy": s.color_accuracy, "background_accuracy": s.background_accuracy,
             "shape_accuracy": s.shape_accuracy}
    return {"accuracy": sum(parts.values()) / len(parts), **parts}


def run(dit, prompts, seeds, cache, size: dict) -> tuple[float, list]:
    """One run of every prompt at once: its wall time and its outputs."""
    from engine.params import ImageParams

    params = [ImageParams(seed=seed, cache=cache, **size) for seed in seeds]
    start = time.perf_counter()
    outputs = dit.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start, outputs


def step_cost(model: str, device: str, batch: int, steps: int, size: dict) -> dict[str, float]:
    """Per-step time of one denoise call on ``batch`` requests: computed vs cached."""
    import torch

    from engine.models.loader import load_adapter
    from engine.params import ImageParams, Limits, StepCache

    adapter = load_adapter(model, device=device)
    info = adapter.info()
    sync = torch.cuda.synchronize if adapter.device.type == "cuda" else (lambda: None)

    def timed(cache) -> list[tuple[float, bool]]:
        shape = {**size, "num_inference_steps": steps}
        params = [ImageParams(seed=i, cache=cache, **shape).resolve(info, Limits()) for i in range(batch)]
        embeds = adapter.encode([f"a red circle on a blue background {i}" for i in range(batch)], params)
        states = [adapter.prepare(str(i), p, *embeds[i]) for i, p in enumerate(params)]
        out = []
        while not states[0].done:
            before = states[0].cached_steps
            start = time.perf_counter()
            with torch.inference_mode():
                adapter.denoise(states)
            sync()
            out.append((time.perf_counter() - start, states[0].cached_steps > before))
        return out

    timed(None)  # warm-up
    computed = [t for t, _ in timed(None)[1:-1]]
    cached = [t for t, hit in timed(StepCache(threshold=1.0, max_cached_steps=steps)) if hit]
    computed_ms = 1e3 * float(np.median(computed))
    cached_ms = 1e3 * float(np.median(cached)) if cached else math.nan
    return {"computed_ms": computed_ms, "cached_ms": cached_ms, "cached_step_cost": cached_ms / computed_ms,
            "batch": batch}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes", help="a model other than shapes gets no accuracy figures")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int, default=None, help="width and height (default: the model's)")
    parser.add_argument("--steps", type=int, default=None, help="denoise steps (default: the model's)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--thresholds", default="0.1,0.2,0.3,0.4,0.5")
    parser.add_argument("--max-cached-steps", type=int, default=3)
    parser.add_argument("--recommend", type=float, default=None, help="report this threshold as recommended")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="requests in the step-cost call")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from engine.models.shapes.dataset import caption, held_out_scenes
    from engine.params import StepCache
    from entrypoints.offline import DiT

    thresholds = [float(t) for t in args.thresholds.split(",")]
    if args.recommend is not None and args.recommend not in thresholds:
        thresholds.append(args.recommend)
    scenes = held_out_scenes(args.prompts)
    prompts = [caption(s) for s in scenes]
    seeds = list(range(len(prompts)))
    scored = args.model == "shapes"
    size = {k: v for k, v in (("width", args.size), ("height", args.size), ("num_inference_steps", args.steps))
            if v is not None}

    def readings(outputs) -> dict[str, float]:
        return accuracy(scenes, [o.images[0] for o in outputs]) if scored else {}

    caches = [StepCache(threshold=t, max_cached_steps=args.max_cached_steps) for t in thresholds]
    walls: dict[int, float] = {}
    outputs: dict[int, list] = {}
    with DiT(model=args.model, device=args.device) as dit:
        steps = args.steps or dit.model_info.default_steps
        run(dit, prompts, seeds, None, size)  # warm-up: the first batches pay allocation and loading
        # Every configuration once per round, so a slow spell of a shared machine hits all alike.
        for _ in range(args.repeats):
            for k, cache in enumerate([None, *caches]):
                wall_s, outs = run(dit, prompts, seeds, cache, size)
                walls[k] = min(walls.get(k, math.inf), wall_s)
                outputs[k] = outs
    base_s, base = walls[0], outputs[0]
    base_images = [np.asarray(o.images[0]) for o in base]
    base_rows = sum(o.computed_steps for o in base)
    uncached = {"wall_s": base_s, **readings(base)}
    sweep = []
    for k, threshold in enumerate(thresholds, start=1):
        wall_s, outs = walls[k], outputs[k]
        computed = sum(o.computed_steps for o in outs)
        cached = sum(o.cached_steps for o in outs)
        acc = readings(outs)
        sweep.append({
            "threshold": threshold, "wall_s": wall_s, "wall_speedup": base_s / wall_s,
            "row_step_reduction": base_rows / computed, "cached_fraction": cached / (computed + cached),
            "psnr_db": float(np.mean([psnr(np.asarray(o.images[0]), b) for o, b in zip(outs, base_images)])),
            **acc, "accuracy_drop_points": 100 * (uncached["accuracy"] - acc["accuracy"]) if scored else 0.0,
        })
    costs = step_cost(args.model, args.device, args.batch, steps, size)

    def within(row: dict) -> bool:
        return row["psnr_db"] >= TARGETS["psnr_db"] and row["accuracy_drop_points"] <= TARGETS["accuracy_drop_points"]

    if args.recommend is not None:
        best = next(r for r in sweep if r["threshold"] == args.recommend)
    else:
        good = [r for r in sweep if within(r)]
        best = max(good, key=lambda r: r["row_step_reduction"]) if good else min(sweep, key=lambda r: r["threshold"])
    met = {"row_step_reduction": best["row_step_reduction"] >= TARGETS["row_step_reduction"],
           "wall_speedup": best["wall_speedup"] >= TARGETS["wall_speedup"],
           "psnr_db": best["psnr_db"] >= TARGETS["psnr_db"],
           "accuracy_drop_points": best["accuracy_drop_points"] <= TARGETS["accuracy_drop_points"]}
    figures = {"model": args.model, "prompts": len(prompts), "steps": steps, "max_cached_steps": args.max_cached_steps,
               "repeats": args.repeats, "uncached": uncached, "sweep": sweep,
               "recommended": {**best, "accuracy_uncached": uncached.get("accuracy")}, "targets": TARGETS, "met": met,
               "step_cost": costs}
    write_json(args.json, figures)

    rows = [("threshold", "rows uncached/cached", "cached", "wall speed-up", "PSNR dB", "accuracy", "drop pts")]
    rows.append(("none", "1.00", "0%", "1.00", "-", f"{uncached.get('accuracy', math.nan):.3f}", "-"))
    for r in sweep:
        mark = " *" if r is best else ""
        rows.append((f"{r['threshold']:g}{mark}", f"{r['row_step_reduction']:.2f}", f"{r['cached_fraction']:.0%}",
                     f"{r['wall_speedup']:.2f}", f"{r['psnr_db']:.1f}", f"{r.get('accuracy', math.nan):.3f}",
                     f"{r['accuracy_drop_points']:.1f}"))
    print_table(f"{args.model}: {len(prompts)} prompts, {steps} steps, at most {args.max_cached_steps} cached steps "
                f"in a row; uncached {base_s:.2f} s; * recommended", rows)
    print_table(f"recommended threshold {best['threshold']:g} against the targets", [
        ("figure", "value", "target", "met"),
        *[(k, f"{best[k]:.2f}", f"{'<=' if k == 'accuracy_drop_points' else '>='} {v:g}", "yes" if met[k] else "no")
          for k, v in TARGETS.items()],
        ("cached step cost", f"{costs['cached_step_cost']:.2f}", "", ""),
    ])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
