"""Offline batch throughput: `gfdit batch` against a plain diffusers loop making the same PNGs.

    python benchmarks/benchmark_batch.py --model tiny-flux --size 256 --num-prompts 64 --json batch.json

Both sides are fresh processes on this machine with the same prompts, size, steps
(the model's default unless --steps), guidance and seeds (each id's batch default seed),
and they make the same images: the largest pixel difference between the two sets is
reported (the engine's batching moves a pixel by at most 1 of 255). The sides run in
alternating rounds (--rounds, default 2; the order flips every round) and each side's
fastest round counts, because a shared machine is noisy.

- batch: `python -m entrypoints.cli batch PROMPTS.jsonl -o DIR --model M --no-progress`
  (what `gfdit batch` runs, with its default executor and in-flight window; more flags via
  --batch-args): reads and checks every line, loads the model, generates through the
  engine, writes each `<id>_0.png` atomically (fsync, rename) and a manifest row.
- baseline: this script with --baseline: loads the same pipeline, then one
  `pipe(prompt, width, height, num_inference_steps, guidance_scale, generator)` call per
  line, saving the PIL image as PNG with zlib level 1 (the engine's PNG setting); no
  manifest, no fsync.

Figures: end to end (`batch_img_s`, `baseline_img_s`, `ratio` = batch / baseline) divide
the images by the wall time of the whole process, start-up included (interpreter, torch
and diffusers imports, building or loading the model): what a user waits for. Generation
only (`batch_gen_img_s`, `baseline_gen_img_s`, `gen_ratio`) divide them by the time after
the model is loaded, as each process reports it (the batch: from the engine being ready
to its last manifest row).

JSON keys (--json PATH): model, size, steps, num_prompts, rounds, threads, batch_args,
batch_img_s, baseline_img_s, ratio, batch_gen_img_s, baseline_gen_img_s, gen_ratio,
batch_s, baseline_s, batch_gen_s, baseline_gen_s (fastest round of each), per_round
(every round's figures), max_pixel_diff.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import print_table, write_json  # noqa: E402

PROMPTS = ["a red fox in the snow", "a blue cat on a boat", "a castle over the sea at night",
           "a green dragon in the forest", "a small robot in the city", "a horse by the river",
           "a lighthouse in a storm", "a bowl of ripe cherries"]


def write_prompts(path: Path, count: int, size: int, steps: int | None) -> None:
    with path.open("w") as file:
        for i in range(count):
            line = {"id": f"p{i:03d}", "prompt": f"{PROMPTS[i % len(PROMPTS)]}, picture {i}", "size": size}
            if steps is not None:
                line["steps"] = steps
            file.write(json.dumps(line) + "\n")


def baseline(prompts: Path, out_dir: Path, model: str, device: str) -> None:
    """The plain loop, in its own process: one pipeline call per line, one PNG per image."""
    import torch

    from engine.models.loader import load_adapter
    from entrypoints.batch_input import read_jobs

    adapter = load_adapter(model, device=device)
    pipe, info = adapter.pipe, adapter.info()
    pipe.set_progress_bar_config(disable=True)
    extra = {"use_resolution_binning": False} if info.family == "pixart" else {}
    loaded = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    for job in read_jobs(prompts.read_text().splitlines()):
        params = job.params
        assert params is not None, job.error
        image = pipe(job.prompt, width=params.width, height=params.height,
                     num_inference_steps=params.num_inference_steps or info.default_steps,
                     guidance_scale=info.default_guidance if params.guidance_scale is None else params.guidance_scale,
                     generator=torch.Generator().manual_seed(params.seed), **extra).images[0]
        image.save(out_dir / f"{job.id}_0.png", compress_level=1)
    print(json.dumps({"gen_s": time.perf_counter() - loaded}))


def run_side(name: str, cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds of the whole process, seconds after the model was loaded)."""
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{name} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    if name == "batch":
        found = re.search(r"in ([\d.]+) s \(", result.stdout)
        if found is None:
            raise SystemExit(f"no timing in the batch's output:\n{result.stdout}")
        return wall, float(found.group(1))
    return wall, json.loads(result.stdout.strip().splitlines()[-1])["gen_s"]


def max_pixel_diff(a: Path, b: Path) -> int:
    import numpy as np
    from PIL import Image

    names = sorted(p.name for p in a.glob("*.png"))
    if names != sorted(p.name for p in b.glob("*.png")):
        raise SystemExit("the two sides made different files")
    return max(int(np.abs(np.asarray(Image.open(a / n), dtype=int) - np.asarray(Image.open(b / n), dtype=int)).max())
               for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-flux", help="preset, diffusers folder or hub id")
    parser.add_argument("--size", type=int, default=256, help="width and height in pixels")
    parser.add_argument("--num-prompts", type=int, default=64, help="lines in the JSONL, one image each")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for both sides")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; each side's fastest counts")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for both sides (default: torch's own choice)")
    parser.add_argument("--batch-args", default="", help="more `gfdit batch` flags, e.g. '--max-in-flight 32'")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument("--baseline", nargs=2, metavar=("PROMPTS", "OUT_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        baseline(Path(args.baseline[0]), Path(args.baseline[1]), args.model, args.device)
        return

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    work = Path(tempfile.mkdtemp(prefix="gfdit-bench-batch-"))
    prompts = work / "prompts.jsonl"
    write_prompts(prompts, args.num_prompts, args.size, args.steps)
    commands = {
        "batch": [sys.executable, "-m", "entrypoints.cli", "--log-level", "warning", "batch", str(prompts),
                  "-o", str(work / "batch"), "--model", args.model, "--device", args.device, "--no-progress",
                  *shlex.split(args.batch_args)],
        "baseline": [sys.executable, str(Path(__file__).resolve()), "--model", args.model, "--device", args.device,
                     "--baseline", str(prompts), str(work / "baseline")],
    }
    per_round: list[dict[str, float]] = []
    try:
        for r in range(args.rounds):
            figures: dict[str, float] = {}
            for name in (("baseline", "batch") if r % 2 == 0 else ("batch", "baseline")):
                shutil.rmtree(work / name, ignore_errors=True)  # a batch would otherwise skip what exists
                figures[f"{name}_s"], figures[f"{name}_gen_s"] = run_side(name, commands[name], env)
                print(f"round {r + 1}: {name} {figures[f'{name}_s']:.2f} s "
                      f"({figures[f'{name}_gen_s']:.2f} s generating)", flush=True)
            per_round.append(figures)
        diff = max_pixel_diff(work / "batch", work / "baseline")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = args.num_prompts
    best = {key: min(f[key] for f in per_round) for key in per_round[0]}
    result = {
        "model": args.model, "size": args.size, "steps": args.steps, "num_prompts": n, "rounds": args.rounds,
        "threads": args.threads, "batch_args": args.batch_args, **best, "per_round": per_round,
        "batch_img_s": n / best["batch_s"], "baseline_img_s": n / best["baseline_s"],
        "batch_gen_img_s": n / best["batch_gen_s"], "baseline_gen_img_s": n / best["baseline_gen_s"],
        "max_pixel_diff": diff,
    }
    result["ratio"] = result["batch_img_s"] / result["baseline_img_s"]
    result["gen_ratio"] = result["batch_gen_img_s"] / result["baseline_gen_img_s"]
    write_json(args.json, result)
    print_table(f"batch throughput: {n} prompts, {args.model} {args.size}x{args.size}, "
                f"best of {args.rounds} rounds, max pixel diff {diff}", [
        ("", "end to end s", "img/s", "generating s", "img/s"),
        ("gfdit batch", f"{best['batch_s']:.2f}", f"{result['batch_img_s']:.2f}", f"{best['batch_gen_s']:.2f}",
         f"{result['batch_gen_img_s']:.2f}"),
        ("diffusers loop", f"{best['baseline_s']:.2f}", f"{result['baseline_img_s']:.2f}",
         f"{best['baseline_gen_s']:.2f}", f"{result['baseline_gen_img_s']:.2f}"),
        ("ratio", "", f"{result['ratio']:.2f}x", "", f"{result['gen_ratio']:.2f}x"),
    ])


if __name__ == "__main__":
    main()
