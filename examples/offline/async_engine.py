"""Embed the engine in your own asyncio program: concurrent requests, progress, cancelling.

    python examples/offline/async_engine.py --model tiny-flux --out-dir out/
"""

import argparse
import asyncio
from pathlib import Path

from engine import AsyncEngine, ImageParams


async def generate(engine: AsyncEngine, prompt: str, params: ImageParams, out_dir: Path) -> None:
    final = None
    async for out in engine.generate(prompt, params):  # progress outputs, then the final one
        if not out.finished and out.step % 4 == 0:
            print(f"{prompt!r}: step {out.step}/{out.num_steps}")
        final = out
    path = out_dir / f"async_{final.seed}.png"
    final.images[0].save(path)  # already encoded as PNG in the worker
    print(f"{prompt!r}: wrote {path} in {final.metrics.latency:.2f}s")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-pixart")
    parser.add_argument("--out-dir", default="out")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    engine = await AsyncEngine.create(model=args.model)  # the same keywords as DiT(...)
    try:
        # Requests from concurrent tasks share the engine's denoising batches.
        await asyncio.gather(*(
            generate(engine, prompt, ImageParams(width=256, height=256, seed=seed, num_inference_steps=args.steps),
                     out_dir)
            for seed, prompt in enumerate(["a red fox", "a blue cat", "a green tree"], start=1)))

        # Cancelling a task (here by a timeout) aborts its request and frees its state.
        slow = ImageParams(width=256, height=256, seed=9, num_inference_steps=200)
        try:
            await asyncio.wait_for(generate(engine, "a very slow one", slow, out_dir), timeout=0.2)
        except asyncio.TimeoutError:
            print(f"'a very slow one': aborted; unfinished requests: {engine.num_unfinished}")
    finally:
        await engine.shutdown()  # aborts what is left and stops the workers


asyncio.run(main())
