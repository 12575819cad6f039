"""``gfdit generate PROMPT -o FILE``: one prompt, saved to a file (``stem_k`` for n > 1)."""

from __future__ import annotations

import argparse
import sys

from engine.config import add_engine_args, engine_options_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from entrypoints.cli import parse_size

    parser.add_argument("prompt", help="what the image should show")
    parser.add_argument("-o", "--output", default="image.png", help="file to write (.png, .jpg, .webp)")
    parser.add_argument("--size", type=parse_size, default=None, help="N or WxH (default: the model's)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--true-cfg-scale", type=float, default=None,
                        help="true CFG scale of true-CFG families (Qwen-Image; with --negative-prompt), "
                             "ignored by the others (default: the model's)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: drawn and printed)")
    parser.add_argument("-n", type=int, default=1, help="images to generate (default: 1)")
    parser.add_argument("--negative-prompt", default=None,
                        help="what the image should not show (ignored by FLUX, as its pipeline does)")
    add_engine_args(parser)


def run(args: argparse.Namespace) -> int:
    from engine.params import ImageParams, InvalidParamsError
    from entrypoints.offline import DiT

    width, height = args.size if args.size else (None, None)
    params = ImageParams(negative_prompt=args.negative_prompt, n=args.n, width=width, height=height,
                         num_inference_steps=args.steps, guidance_scale=args.guidance,
                         true_cfg_scale=args.true_cfg_scale, seed=args.seed)
    with DiT(**engine_options_from_args(args)) as dit:
        try:
            output = dit.generate(args.prompt, params)[0]
        except InvalidParamsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        paths = output.save(args.output)
    metrics = output.metrics
    latency = f" in {metrics.latency:.2f}s" if metrics and metrics.latency is not None else ""
    for path in paths:
        print(f"wrote {path} ({output.images[0].width}x{output.images[0].height}, seed {output.seed}){latency}")
    return 0
