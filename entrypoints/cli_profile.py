"""``gfdit profile [MODEL] -o FILE``: time encode, denoise and decode here; write a cost-model profile.

    gfdit profile small-pixart --worker-threads 1 -o profile.json
    gfdit profile small-pixart --num-workers 2 --sizes 256,512 -o profile.json   # degrees 1 and 2

The profile feeds ``--profile`` of the engine (cost-aware policies) and of ``gfdit simulate``.
Use the engine options the server will use (device, dtype, workers, threads per worker):
the figures are only as good as that match.
"""

from __future__ import annotations

import argparse
import os
import sys

from engine.config import DEFAULT_MODEL, add_engine_args, engine_options_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"model to measure (default: {DEFAULT_MODEL})")
    parser.add_argument("-o", "--output", required=True, help="profile JSON to write")
    parser.add_argument("--sizes", default="256,512", help="image sizes, N or WxH, comma-separated")
    parser.add_argument("--batch-sizes", default="1,2,4", help="images per task, comma-separated")
    parser.add_argument("--degrees", default=None,
                        help="sequence-parallel degrees (default: all the workers and the model allow)")
    parser.add_argument("--cycles", type=int, default=2, help="timed encode/steps/decode cycles per point")
    parser.add_argument("--steps", type=int, default=3, help="denoise steps timed per cycle")
    add_engine_args(parser, with_model=False)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from engine.config import EngineConfig
    from engine.profiler import ProfileSpec, parse_sizes

    try:
        spec = ProfileSpec(sizes=parse_sizes(args.sizes),
                           batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
                           degrees=tuple(int(d) for d in args.degrees.split(",")) if args.degrees else None,
                           cycles=args.cycles, steps=args.steps)
    except ValueError as exc:
        print(f"error: bad --sizes, --batch-sizes or --degrees: {exc}", file=sys.stderr)
        return 2
    config = EngineConfig.create(**engine_options_from_args(args))  # includes the positional model
    profile = asyncio.run(_measure(config, spec, args))
    profile.save(args.output)
    for point in profile.points:
        print(f"{point.stage:8} {point.width}x{point.height} batch {point.batch} degree {point.degree}: "
              f"{point.ms:.1f} ms")
    print(f"wrote {args.output}")
    return 0


async def _measure(config, spec, args: argparse.Namespace):
    from engine.async_engine import make_executor
    from engine.profiler import Profiler

    threads = config.parallel.worker_threads
    if threads:
        import torch

        torch.set_num_threads(threads)  # the in-process worker runs in this process
    profiler = Profiler(make_executor(config))
    info = await profiler.start()
    try:
        device = _device_name(info.device, profiler.executor.num_workers, threads)
        source = (f"gfdit profile {args.model} --sizes {args.sizes} --batch-sizes {args.batch_sizes} "
                  f"--cycles {args.cycles} --steps {args.steps}; wall time per task, submit to result, median")
        return await profiler.measure(spec, args.model, device, source=source)
    finally:
        await profiler.shutdown()


def _device_name(device: str, workers: int, threads: int | None) -> str:
    if device.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name(0)} x{workers}"
    import torch

    return (f"cpu ({os.cpu_count()} cores), {workers} worker(s), "
            f"{threads or torch.get_num_threads()} torch thread(s) each")
