"""``gfdit batch INPUT.jsonl --output-dir DIR``: generate every line, resumable.

Exit status: 0 when every line produced its images; 3 when every line was handled but
some failed (their manifest rows carry the error); 130 when interrupted (Ctrl-C); 2 for
a usage error. Re-running the same command skips what is already done.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from engine.config import add_engine_args, engine_options_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("input", help="JSONL file, one request per line ('-' for stdin)")
    parser.add_argument("--output-dir", "-o", required=True, help="where images and manifest.jsonl go")
    parser.add_argument("--max-in-flight", type=int, default=64,
                        help="requests in the engine at once (default: 64)")
    parser.add_argument("--workers", dest="num_workers", type=int, default=None,
                        help="worker processes (same as --num-workers)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_engine_args(parser)


def run(args: argparse.Namespace) -> int:
    from entrypoints.batch import EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_FAILED, open_input

    if args.input != "-" and not Path(args.input).is_file():
        print(f"error: no such input file: {args.input}", file=sys.stderr)
        return 2
    if args.max_in_flight < 1:
        print("error: --max-in-flight must be at least 1", file=sys.stderr)
        return 2
    try:
        with open_input(args.input) as lines:
            stats = asyncio.run(_main(args, lines))
    except KeyboardInterrupt:
        print("interrupted: finished images are kept; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"done: {stats.done} requests ({stats.images} images), {stats.skipped} already done "
          f"({stats.failed_before} of them failed lines), {stats.failed} failed")
    for error in stats.errors[:20]:
        print(f"  {error}", file=sys.stderr)
    return EXIT_SOME_FAILED if stats.failed or stats.failed_before else EXIT_OK


async def _main(args: argparse.Namespace, lines):
    from tqdm import tqdm

    from engine.async_engine import AsyncEngine
    from entrypoints.batch import run_batch

    engine = await AsyncEngine.create(**engine_options_from_args(args))
    progress = tqdm(total=0, unit="img", desc="images", disable=args.no_progress)
    try:
        return await run_batch(engine, lines, Path(args.output_dir), max_in_flight=args.max_in_flight,
                               progress=progress)
    finally:
        progress.close()
        await engine.shutdown()
