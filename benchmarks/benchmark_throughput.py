"""Offline throughput: the same N requests through gfdit and through diffusers one at a time.

    python benchmarks/benchmark_throughput.py --model tiny-flux --size 256 --num-requests 16
    python benchmarks/benchmark_throughput.py --model small-pixart --size 512 --num-requests 4 --steps 8
    python benchmarks/benchmark_throughput.py --model tiny-qwen-image --size 256 --num-requests 16

Both run in this process on the same device, after one warm-up request each, in
alternating rounds (--repeats, default 2); each side's fastest round counts, so a burst
of load from elsewhere on a shared machine hits neither side alone. Every request has
its own prompt and seed. The engine gets all requests at
once (as `DiT.generate` does) and batches their denoising steps; the baseline calls the
plain pipeline once per request. Images come back as PIL images in both.

JSON keys (--json PATH): model, size, num_requests, steps, engine_img_s, baseline_img_s,
ratio (engine / baseline), engine_s, baseline_s (fastest round of each), repeats.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import print_table, write_json  # noqa: E402
from engine import ImageParams  # noqa: E402
from engine.models.loader import load_adapter  # noqa: E402
from entrypoints import DiT  # noqa: E402

PROMPTS = ["a red fox in the snow", "a blue cat on a boat", "a castle over the sea at night",
           "a green dragon in the forest", "a small robot in the city", "a horse by the river"]


def make_requests(count: int, size: int, steps: int | None) -> list[tuple[str, ImageParams]]:
    return [(f"{PROMPTS[i % len(PROMPTS)]} {i}", ImageParams(seed=1000 + i, width=size, height=size,
                                                            num_inference_steps=steps))
            for i in range(count)]


def baseline_runner(model: str, device: str) -> Callable[[list[tuple[str, ImageParams]]], float]:
    adapter = load_adapter(model, device=device)
    pipe = adapter.pipe
    info = adapter.info()
    kwargs = {"use_resolution_binning": False} if info.family == "pixart" else {}
    # The model's default guidance, as the engine resolves it: true-CFG families take
    # true_cfg_scale (off without a negative prompt, on both sides), the others guidance_scale.
    if info.guidance == "true_cfg":
        kwargs["true_cfg_scale"] = info.default_true_cfg_scale
    else:
        kwargs["guidance_scale"] = info.default_guidance

    def call(prompt: str, params: ImageParams) -> None:
        pipe(prompt, width=params.width, height=params.height,
             num_inference_steps=params.num_inference_steps or info.default_steps,
             generator=torch.Generator().manual_seed(params.seed), output_type="pil", **kwargs)

    def run(requests: list[tuple[str, ImageParams]]) -> float:
        start = time.perf_counter()
        for prompt, params in requests:
            call(prompt, params)
        return time.perf_counter() - start

    return run


def engine_runner(dit: DiT) -> Callable[[list[tuple[str, ImageParams]]], float]:
    def run(requests: list[tuple[str, ImageParams]]) -> float:
        start = time.perf_counter()
        dit.generate([p for p, _ in requests], [q for _, q in requests], use_tqdm=False)
        return time.perf_counter() - start

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-flux")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--max-batch-size", type=int, default=None, help="default: the engine's")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds; the fastest counts")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    requests = make_requests(args.num_requests, args.size, args.steps)
    with DiT(model=args.model, device=args.device, max_batch_size=args.max_batch_size) as dit:
        runners = {"engine": engine_runner(dit), "baseline": baseline_runner(args.model, args.device)}
        best = {}
        for run in runners.values():
            run(requests[:1])  # warm-up
        for _ in range(args.repeats):
            for name, run in runners.items():
                best[name] = min(best.get(name, float("inf")), run(requests))
    engine_s, baseline_s = best["engine"], best["baseline"]
    n = args.num_requests
    figures = {
        "model": args.model, "size": args.size, "num_requests": n, "steps": args.steps, "repeats": args.repeats,
        "engine_s": engine_s, "baseline_s": baseline_s,
        "engine_img_s": n / engine_s, "baseline_img_s": n / baseline_s, "ratio": baseline_s / engine_s,
    }
    write_json(args.json, figures)
    print_table(f"throughput: {n} requests, {args.model} {args.size}x{args.size}", [
        ("runner", "seconds", "img/s"),
        ("gfdit engine", f"{engine_s:.2f}", f"{figures['engine_img_s']:.2f}"),
        ("diffusers, one at a time", f"{baseline_s:.2f}", f"{figures['baseline_img_s']:.2f}"),
        ("ratio", "", f"{figures['ratio']:.2f}x"),
    ])


if __name__ == "__main__":
    main()
