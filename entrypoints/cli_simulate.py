"""``gfdit simulate``: every policy on one simulated cluster and workload, side by side.

    gfdit simulate                                   # 4 GPUs, H20 Qwen-Image, S/M/L at load 1.1
    gfdit simulate --num-gpus 8 --load 0.8 --duration 1800 --json sim.json
    gfdit simulate --profile cpu_small_pixart --num-gpus 2 --workload wl.jsonl --saturate 0
    gfdit simulate --load 0.8 --interference 1:600:2400 --policies static-1,fcfs,edf,elastic

The real scheduler and policies run against a virtual clock; workers are replaced by the
cost model of ``--profile``. Pure Python: no torch, no GPU.

``--interference GPU:START:END[:UTIL]`` shares one GPU with a foreign job (UTIL %, default
100) for a window (engine/sim/interference.py). The GPU runs slower in the window in
every run; each policy runs twice, blind (the scheduler knows nothing) and with
telemetry (scripted NVML readings, sampled every ``--telemetry-period`` s), and the
output ends with both side by side. The JSON then also holds, under ``policies``, the
telemetry runs as ``<policy>+telemetry``, every run with ``window_slo_attainment`` (the
requests that arrived in the window), and an ``interference`` object: ``gpu``,
``start_s``, ``end_s``, ``util``, ``speed`` (the shared GPU's speed in the window),
``telemetry_period_s``, and ``policies``: per policy, ``blind`` and ``telemetry``, each
with ``slo_attainment``, ``window_slo_attainment``, ``mean_latency_s`` and
``p95_latency_s``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="h20_qwen_image",
                        help="a shipped profile name or a profile JSON (gfdit profile writes one)")
    parser.add_argument("--num-gpus", type=int, default=4, help="workers in the simulated cluster")
    parser.add_argument("--policies", default=None,
                        help="comma-separated: static-K, fcfs, srtf, edf, elastic, module:Class "
                             "(default: static at every degree the profile has, then fcfs, srtf, edf, elastic)")
    parser.add_argument("--baseline", default=None, help="the policy the others are compared with "
                        "(default: static at the largest degree)")
    parser.add_argument("--classes", default=None,
                        help="NAME:WxH:WEIGHT:ALPHA[:STEPS],... (default: S:512x512:0.5:1.5,"
                             "M:1024x1024:0.3:2.0,L:1536x1536:0.2:6.0)")
    parser.add_argument("--load", type=float, default=1.1,
                        help="offered single-GPU work / (GPUs x window)")
    parser.add_argument("--duration", type=float, default=3600.0, help="arrival window in seconds")
    parser.add_argument("--phases", default=None,
                        help="piecewise-Poisson DURATION:LOAD,... (instead of --load/--duration)")
    parser.add_argument("--saturate", type=int, default=200,
                        help="requests at t=0 for the saturated-throughput run (0: skip it)")
    parser.add_argument("--workload", default=None, help="a JSONL workload (benchmarks/workloads.py writes one)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the profile's)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the workload (default: 0)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="workloads to draw (seeds SEED, SEED+1, ...); the figures are their mean")
    parser.add_argument("--max-batch-size", type=int, default=16, help="most images in one simulated batch (default: 16)")
    parser.add_argument("--max-batch-tokens", type=int, default=None,
                        help="most image-token rows per worker in one simulated denoise batch, as the engine's "
                             "--max-batch-tokens (default: the engine's for the profile's device: 2048 on a CPU, "
                             "no cap on a GPU)")
    parser.add_argument("--migration-ms", type=float, default=None,
                        help="flat cost per state migration (default: the profile's model)")
    parser.add_argument("--jitter", type=float, default=0.0,
                        help="log-normal sigma on every task time (0: exactly the cost model)")
    parser.add_argument("--cache-hit-rate", type=float, default=0.0,
                        help="every request runs a step cache reusing this share of its steps (a measured "
                             "figure: benchmark_cache.py's cached_fraction); 0: no step cache")
    parser.add_argument("--interference", default=None,
                        help="GPU:START:END[:UTIL]: a foreign job at UTIL %% (default 100) shares GPU from START to "
                             "END s; every policy runs blind and with telemetry, side by side")
    parser.add_argument("--telemetry-period", type=float, default=0.2,
                        help="seconds between the simulated telemetry samples with --interference (default: 0.2)")
    parser.add_argument("--json", default=None, help="write the figures here")


def run(args: argparse.Namespace) -> int:
    from engine.scheduler.cost_model import CostModel
    from engine.scheduler.profile import ProfileError
    from engine.sim.experiment import (
        PAPER,
        PolicyResult,
        PolicySpec,
        average,
        compare,
        default_policies,
        run_policies,
        saturation_bound,
    )
    from engine.sim.interference import Interference, SimulatedTelemetry
    from engine.sim.report import finite
    from engine.sim.workload import (
        DEFAULT_CLASSES,
        Phase,
        RequestClass,
        generate,
        load_jsonl,
        offered_load,
    )

    try:
        cm = CostModel.load(args.profile)
        classes = ([RequestClass.parse(c) for c in args.classes.split(",")] if args.classes
                   else list(DEFAULT_CLASSES))
        phases = Phase.parse_list(args.phases) if args.phases else [Phase(args.duration, args.load)]
        interference = Interference.parse(args.interference) if args.interference else None
        if interference is not None and interference.gpu >= args.num_gpus:
            raise ValueError(f"--interference: GPU {interference.gpu} is not one of the {args.num_gpus} GPUs")
        if args.telemetry_period <= 0:
            raise ValueError("--telemetry-period must be > 0")
    except (ProfileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.migration_ms is not None:
        cm = cm.with_migration(args.migration_ms)
    degrees = tuple(d for d in cm.degrees if d <= args.num_gpus)
    specs = ([PolicySpec.parse(s) for s in args.policies.split(",")] if args.policies
             else default_policies(degrees))
    baseline = args.baseline or f"static-{max(degrees)}"
    seeds = [args.seed] if args.workload else list(range(args.seed, args.seed + args.seeds))

    runs: list[dict[str, dict]] = []  # per seed: policy label -> figures
    loads = []
    for seed in seeds:
        if args.workload:
            workload = load_jsonl(args.workload)
            window = max((w.arrival_s for w in workload), default=0.0) or 1.0
        else:
            workload = generate(classes, cm, num_gpus=args.num_gpus, phases=phases, steps=args.steps, seed=seed)
            window = sum(p.duration_s for p in phases)
        saturated = generate(classes, cm, num_gpus=args.num_gpus, saturate=args.saturate, steps=args.steps,
                             seed=seed) if args.saturate else []
        options = {"max_batch_size": args.max_batch_size, "max_batch_tokens": args.max_batch_tokens,
                   "cache_hit_rate": args.cache_hit_rate,
                   "jitter": args.jitter, "seed": seed}
        try:
            if interference is None:
                results = run_policies(specs, cm, args.num_gpus, workload, saturated, **options)
                runs.append({r.spec.label: r.to_dict() for r in results})
            else:
                shared = interference.shared_device()
                blind = run_policies(specs, cm, args.num_gpus, workload, saturated, speed=shared, **options)
                aware = run_policies(specs, cm, args.num_gpus, workload, saturated, speed=shared, **options,
                                     make_observe=lambda: SimulatedTelemetry(
                                         interference.source(args.num_gpus), args.num_gpus, args.telemetry_period))

                def figures_of(result: PolicyResult) -> dict:
                    out = result.to_dict()
                    if result.loaded is not None:
                        out["window_slo_attainment"] = interference.window_attainment(result.loaded.records)
                    return out

                runs.append({**{r.spec.label: figures_of(r) for r in blind},
                             **{f"{r.spec.label}+telemetry": figures_of(r) for r in aware}})
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        loads.append(offered_load(workload, cm, args.num_gpus, window))
    figures = {label: average([run[label] for run in runs]) for label in runs[0]}
    if len(seeds) > 1:
        for label, f in figures.items():
            f["per_seed"] = [run[label] for run in runs]

    labels = sorted({w.label for w in workload}) if args.workload else [c.name for c in classes]
    print(f"profile {args.profile} ({cm.profile.model} on {cm.profile.device}); {args.num_gpus} GPUs, degrees {degrees}")
    for line in cm.describe():
        print(f"  {line}")
    print(f"workload: {len(workload)} requests over {window:.0f} s, offered load {sum(loads) / len(loads):.2f}"
          + ("" if args.workload else "; classes " + ", ".join(
              f"{c.name} {c.width}x{c.height} w={c.weight:g} alpha={c.alpha}" for c in classes))
          + (f"; saturation: {args.saturate} requests at t=0" if args.saturate else "")
          + (f"; mean over seeds {seeds[0]}..{seeds[-1]}" if len(seeds) > 1 else f"; seed {seeds[0]}"))
    _print_table(figures, labels)

    comparisons = {}
    bound = saturation_bound(classes, cm, int(baseline.split("-")[1]), degrees, args.steps) \
        if baseline.startswith("static-") and not args.workload else math.nan
    if baseline in figures:
        for label in ("elastic", "edf"):
            if label in figures:
                comparisons[label] = compare(figures[label], figures[baseline])
                statics = [f for name, f in figures.items() if name.startswith("static-") and "+" not in name]
                best = all(figures[label]["slo_attainment"] > f["slo_attainment"] for f in statics)
                comparisons[label]["best_slo_attainment_vs_static"] = best
                _print_comparison(label, baseline, comparisons[label], bound, PAPER)
    side_by_side = _interference(interference, specs, figures) if interference is not None else None
    if args.json:
        out = {
            "config": {"profile": args.profile, "num_gpus": args.num_gpus, "degrees": list(degrees),
                       "classes": [c.__dict__ for c in classes], "target_load": args.load,
                       "offered_load": sum(loads) / len(loads), "window_s": window, "requests": len(workload),
                       "saturation_requests": args.saturate, "seeds": seeds, "jitter": args.jitter,
                       "max_batch_size": args.max_batch_size, "migration_ms": args.migration_ms,
                       "workload_file": args.workload, "baseline": baseline},
            "policies": figures,
            "comparison": {label: {"baseline": baseline, **c} for label, c in comparisons.items()},
            "saturated_throughput_bound_x": bound,
            "paper": PAPER,
        }
        if side_by_side is not None:
            out["interference"] = {"gpu": interference.gpu, "start_s": interference.start_s,
                                   "end_s": interference.end_s, "util": interference.util,
                                   "speed": interference.speed(), "telemetry_period_s": args.telemetry_period,
                                   "policies": side_by_side}
        Path(args.json).write_text(json.dumps(finite(out), indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


def _print_table(figures: dict[str, dict], labels: list[str]) -> None:
    head = ["policy", "req/s", "sat req/s", "mean s", "p95 s", "SLO", *(f"SLO {k}" for k in labels),
            "degree mix (image-steps)", "migr."]
    rows = [head]
    for name, f in figures.items():
        sat = f"{f['saturated_throughput']:.4f}" if "saturated_throughput" in f else "-"
        if "slo_attainment" not in f:
            rows.append([name, "-", sat, *["-"] * (len(head) - 3)])
            continue
        steps = f["denoise_image_steps_by_degree"]
        total = sum(steps.values()) or 1
        mix = " ".join(f"{d}:{n / total:.0%}" for d, n in steps.items())
        rows.append([name, f"{f['throughput']:.4f}", sat, f"{f['mean_latency_s']:.1f}", f"{f['p95_latency_s']:.1f}",
                     _pct(f["slo_attainment"]), *(_pct(f["class_attainment"].get(k, math.nan)) for k in labels),
                     mix, f"{f['migrations']:.0f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    print()
    for k, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def _print_comparison(label: str, baseline: str, c: dict, bound: float, paper: dict) -> None:
    def x(key: str) -> str:
        value = c.get(key, math.nan)
        return "     -" if math.isnan(value) else f"{value:6.2f}x"

    print(f"\n{label} vs {baseline}          gfdit      target    GF-DiT paper (up to)")
    print(f"  SLO violations            {x('slo_violation_x')}    <= 0.10x   "
          f"{1 + paper['slo_violation_change']:.2f}x ({paper['slo_violation_change']:+.0%})")
    print(f"  mean latency              {x('mean_latency_x')}    <= 0.50x   "
          f"{1 + paper['mean_latency_change']:.2f}x ({paper['mean_latency_change']:+.0%})")
    most = "" if math.isnan(bound) else f"   (the most this profile and mix allow: {bound:.2f}x)"
    print(f"  saturated throughput      {x('saturated_throughput_x')}    >= 3.00x   {paper['throughput_x']:.2f}x{most}")
    print(f"  best SLO attainment vs every static: {'yes' if c['best_slo_attainment_vs_static'] else 'no'}")


def _interference(interference, specs, figures: dict[str, dict]) -> dict[str, dict]:
    """Print each policy blind and with telemetry side by side; return the same figures."""
    keys = ("slo_attainment", "window_slo_attainment", "mean_latency_s", "p95_latency_s")
    print(f"\ninterference: GPU {interference.gpu} shared with a foreign job at {interference.util:g} % "
          f"from {interference.start_s:g} s to {interference.end_s:g} s (it runs at {interference.speed():.2f}x)")
    head = ["policy", "SLO blind", "SLO telemetry", "in window blind", "in window telemetry",
            "mean s blind", "mean s telemetry"]
    rows, out = [head], {}
    for spec in specs:
        blind, aware = figures[spec.label], figures[f"{spec.label}+telemetry"]
        if "slo_attainment" not in blind:
            continue
        out[spec.label] = {"blind": {k: blind[k] for k in keys}, "telemetry": {k: aware[k] for k in keys}}
        rows.append([spec.label, _pct(blind["slo_attainment"]), _pct(aware["slo_attainment"]),
                     _pct(blind["window_slo_attainment"]), _pct(aware["window_slo_attainment"]),
                     f"{blind['mean_latency_s']:.1f}", f"{aware['mean_latency_s']:.1f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for k, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    return out


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1%}"
