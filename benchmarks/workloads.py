"""Write a workload as JSON lines, for `gfdit simulate --workload` and `benchmark_serving.py --workload`.

    python benchmarks/workloads.py --profile cpu_small_pixart --num-gpus 2 \\
        --classes S:256x256:0.5:3,L:512x512:0.5:3 --load 0.7 --duration 300 -o wl.jsonl
    python benchmarks/workloads.py --saturate 50 -o saturated.jsonl        # H20 S/M/L at t=0

Classes are NAME:WxH:WEIGHT:ALPHA[:STEPS]; a request's deadline is ALPHA x its class's
single-GPU latency on the profile; arrivals are Poisson at the target load (offered
single-GPU work / (GPUs x window)), or piecewise with --phases DURATION:LOAD,... The
generator itself lives in engine/sim/workload.py so that the installed `gfdit simulate`
has it too; this script is its command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.scheduler.cost_model import CostModel  # noqa: E402
from engine.sim.workload import (  # noqa: E402, F401 - re-exported for scripts
    DEFAULT_CLASSES,
    Phase,
    RequestClass,
    WorkloadRequest,
    generate,
    load_jsonl,
    offered_load,
    save_jsonl,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="h20_qwen_image", help="shipped profile name or profile JSON")
    parser.add_argument("--num-gpus", type=int, default=4)
    parser.add_argument("--classes", default=None, help="NAME:WxH:WEIGHT:ALPHA[:STEPS],... (default: H20 S/M/L)")
    parser.add_argument("--load", type=float, default=1.1)
    parser.add_argument("--duration", type=float, default=3600.0)
    parser.add_argument("--phases", default=None, help="DURATION:LOAD,... instead of --load/--duration")
    parser.add_argument("--saturate", type=int, default=0, help="N requests at t=0 instead of arrivals")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the profile's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args(argv)

    cm = CostModel.load(args.profile)
    classes = [RequestClass.parse(c) for c in args.classes.split(",")] if args.classes else list(DEFAULT_CLASSES)
    phases = [] if args.saturate else (Phase.parse_list(args.phases) if args.phases
                                       else [Phase(args.duration, args.load)])
    requests = generate(classes, cm, num_gpus=args.num_gpus, phases=phases, saturate=args.saturate,
                        steps=args.steps, seed=args.seed)
    save_jsonl(requests, args.output)
    window = sum(p.duration_s for p in phases)
    counts = Counter(r.label for r in requests)
    load = f", offered load {offered_load(requests, cm, args.num_gpus, window):.2f}" if window else ""
    print(f"wrote {len(requests)} requests to {args.output}{load}: "
          + ", ".join(f"{c.name} {c.width}x{c.height} x{counts[c.name]}" for c in classes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
