"""Generate images from Python with the offline API.

    python examples/offline/generate.py --model tiny-pixart --out-dir out/
"""

import argparse
from pathlib import Path

from engine import ImageParams
from entrypoints import DiT

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="tiny-pixart")
parser.add_argument("--out-dir", default="out")
parser.add_argument("--steps", type=int, default=None)
args = parser.parse_args()

prompts = ["a red fox in the snow", "a castle over the sea at night", "a small robot in a garden"]
# One ImageParams per prompt: each request keeps its own size, seed and guidance,
# and the engine still batches their denoising steps together.
params = [
    ImageParams(width=256, height=256, seed=1, num_inference_steps=args.steps),
    ImageParams(width=256, height=256, seed=2, guidance_scale=6.0, num_inference_steps=args.steps),
    ImageParams(width=256, height=128, seed=3, n=2, num_inference_steps=args.steps),
]

out_dir = Path(args.out_dir)
out_dir.mkdir(parents=True, exist_ok=True)
with DiT(model=args.model) as dit:
    for i, output in enumerate(dit.generate(prompts, params)):
        for path in output.save(out_dir / f"prompt{i}.png"):
            print(f"{path}  seed={output.seed}  {output.metrics.latency:.2f}s")
