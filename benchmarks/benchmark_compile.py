"""Eager vs regionally compiled denoise steps (``--compile``), over batch sizes that vary.

    nice -n 19 python benchmarks/benchmark_compile.py --json compile.json
    python benchmarks/benchmark_compile.py --model small-pixart --size 256 --steps 50 --device cuda

Two copies of the model: one eager, one with its repeated blocks compiled by inductor
(engine/models/compile.py, as the workers do it). For each of --steps steps a batch of
1 to --max-requests requests (seeded draw; CFG doubles the rows) takes one denoise step
(transformer, CFG, scheduler) on each copy, the two alternating so load from elsewhere
hits both. Both copies hold the same requests (same seeds, same batches), so their
latents are compared at the end.

Inductor's on-disk cache starts empty (a fresh temporary directory), so the figures are
a cold start's; --cache-dir DIR keeps it, and a second run with the same DIR shows a warm
start.

JSON keys (--json PATH): compile_speedup (eager over compiled time, summed over the steps
that compiled nothing), compile_time_s (over every step that compiled a graph: its time
minus the median compiled time of its batch size, or its eager time when no other step
had that size), recompiles (graphs compiled after the first step), graphs (all graphs
compiled), first_step_compile_s (the first step's part of compile_time_s, what start-up
costs), backend_compile_s (time inside inductor alone), eager_step_ms and compiled_step_ms
(medians over the steps that compiled nothing), max_abs_diff (final latents), batch_sizes
(requests per step), model, size, steps, device, torch_threads, cache (cold or warm), backend.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small-pixart", help="preset or diffusers folder")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50, help="denoise steps, each at a drawn batch size")
    parser.add_argument("--max-requests", type=int, default=4, help="largest batch, in requests")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0, help="seeds the batch-size draw")
    parser.add_argument("--backend", default="inductor",
                        help="torch.compile backend (eager: dynamo's tracing alone, for dry runs)")
    parser.add_argument("--cache-dir", default=None,
                        help="inductor's cache directory, kept (default: a fresh temporary one: a cold start)")
    parser.add_argument("--json", default=None)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # Before torch is imported: inductor reads its cache location once.
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="gfdit-inductor-")
    warm = os.path.isdir(cache_dir) and any(os.scandir(cache_dir))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir

    import torch

    from benchmarks.common import print_table, write_json
    from engine.models.compile import compile_repeated_blocks
    from engine.models.loader import load_adapter
    from engine.request import ImageParams

    eager = load_adapter(args.model, args.device, args.dtype)
    compiled = load_adapter(args.model, args.device, args.dtype)
    stats = compile_repeated_blocks(compiled.transformer, backend=args.backend)
    on_gpu = eager.device.type == "cuda"

    def pool(adapter):
        params = [ImageParams(width=args.size, height=args.size, num_inference_steps=args.steps + 1, seed=i,
                              guidance_scale=adapter.info().default_guidance, negative_prompt="", n=1,
                              output_format="raw") for i in range(args.max_requests)]
        return adapter.new_states([str(i) for i in range(len(params))],
                                  [f"a castle over the sea, number {i}" for i in range(len(params))], params)

    def timed_step(adapter, states) -> float:
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        adapter.denoise(states)
        if on_gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    eager_pool, compiled_pool = pool(eager), pool(compiled)
    draw = random.Random(args.seed)
    sizes = [draw.randint(1, args.max_requests) for _ in range(args.steps)]
    rows = []  # (requests, eager_s, compiled_s, graphs compiled in the step)
    for k in sizes:
        before = stats.graphs
        compiled_s = timed_step(compiled, compiled_pool[:k])
        eager_s = timed_step(eager, eager_pool[:k])
        rows.append((k, eager_s, compiled_s, stats.graphs - before))

    steady = [r for r in rows if r[3] == 0]
    steady_by_size = {k: statistics.median([r[2] for r in steady if r[0] == k])
                      for k in {r[0] for r in steady}}
    extra = [r[2] - steady_by_size.get(r[0], r[1]) for r in rows if r[3]]
    eager_total, compiled_total = sum(r[1] for r in steady), sum(r[2] for r in steady)
    diff = max((a.latents.float() - b.latents.float()).abs().max().item()
               for a, b in zip(eager_pool, compiled_pool))
    figures = {
        "compile_speedup": eager_total / compiled_total if compiled_total else float("nan"),
        "compile_time_s": sum(extra),
        "recompiles": stats.graphs - rows[0][3],
        "graphs": stats.graphs,
        "first_step_compile_s": extra[0] if rows[0][3] else 0.0,
        "backend_compile_s": stats.backend_seconds,
        "eager_step_ms": statistics.median(r[1] for r in steady) * 1e3 if steady else float("nan"),
        "compiled_step_ms": statistics.median(r[2] for r in steady) * 1e3 if steady else float("nan"),
        "max_abs_diff": diff, "batch_sizes": sizes, "model": args.model, "size": args.size,
        "steps": args.steps, "device": str(eager.device), "torch_threads": torch.get_num_threads(),
        "cache": "warm" if warm else "cold", "backend": args.backend,
    }
    write_json(args.json, figures)
    print_table(f"compile: {args.model} {args.size}x{args.size}, {args.steps} steps of 1-{args.max_requests} "
                f"requests, {figures['device']}, {args.backend}, cache {figures['cache']}", [
        ("measure", "value"),
        ("eager step, median (ms)", f"{figures['eager_step_ms']:.1f}"),
        ("compiled step, median (ms)", f"{figures['compiled_step_ms']:.1f}"),
        ("compile_speedup", f"{figures['compile_speedup']:.2f}x"),
        ("compile_time_s (first step)", f"{figures['compile_time_s']:.1f} ({figures['first_step_compile_s']:.1f})"),
        ("graphs compiled / recompiles", f"{figures['graphs']} / {figures['recompiles']}"),
        ("max |eager - compiled| latents", f"{diff:.2e}"),
    ])


if __name__ == "__main__":
    main()
