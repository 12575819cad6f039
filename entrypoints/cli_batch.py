"""``gfdit batch INPUT.jsonl --output-dir DIR``: generate every line, resumable.

Each line is a JSON object: "prompt" and optionally "id", "negative_prompt", "size"
("WxH" or N), "steps", "guidance", "seed", "n", "output_format" (png, jpeg, webp).
Images go to DIR/<id>_<k>.<format> (a line without an id is line-<N>); DIR/manifest.jsonl
gets one row per line: id, status, files, seed, params, timings, error. Seeds default to
a hash of the id. Running the same command again skips what is done, retries requests
that failed, and redoes lines that were edited (or were out of bounds, when the model or
the --max-* limits changed).

Exit status: 0 every line produced its images; 3 every line was handled but some are
bad or failed (their manifest rows say why); 1 the run could not go on (disk, engine;
what finished is kept); 2 usage error; 130 Ctrl-C; 143 SIGTERM. After 1, 130 or 143,
the same command resumes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path
from typing import TextIO

from engine.config import add_engine_args, engine_options_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.replace("``", "")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("input", help="JSONL file, one request per line ('-' for stdin)")
    parser.add_argument("--output-dir", "-o", required=True, help="where the images and manifest.jsonl go")
    parser.add_argument("--max-in-flight", type=int, default=None,
                        help="requests in the engine at once (default: 2 x max batch size x workers, at least 16)")
    parser.add_argument("--workers", dest="num_workers", type=int, default=None,
                        help="worker processes, one per device (same as --num-workers)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_engine_args(parser)


def run(args: argparse.Namespace) -> int:
    from engine.async_engine import EngineDeadError
    from entrypoints.batch import (
        EXIT_FATAL,
        EXIT_INTERRUPTED,
        EXIT_TERMINATED,
        EXIT_USAGE,
        open_input,
    )
    from entrypoints.batch_manifest import ManifestLockedError

    if args.input != "-" and not Path(args.input).is_file():
        print(f"error: no such input file: {args.input}", file=sys.stderr)
        return EXIT_USAGE
    if args.max_in_flight is not None and args.max_in_flight < 1:
        print("error: --max-in-flight must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    from engine.models.sources import check_model_source

    check_model_source(engine_options_from_args(args)["model"])  # before the progress bar
    terminated: list[int] = []
    resume = "finished images are kept; run the same command again to resume"
    try:
        with open_input(args.input) as lines:
            stats = asyncio.run(_main(args, lines, terminated))
    except KeyboardInterrupt:
        print(f"interrupted: {resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except asyncio.CancelledError:
        if not terminated:
            raise
        print(f"terminated: {resume}", file=sys.stderr)
        return EXIT_TERMINATED
    except (ManifestLockedError, OSError, EngineDeadError) as exc:
        print(f"error: {exc}; {resume}", file=sys.stderr)
        return EXIT_FATAL
    print(f"done: {stats.done} requests ({stats.images} images), {stats.skipped} already done "
          f"({stats.failed_before} of them failed lines), {stats.failed} failed, "
          f"in {stats.elapsed_s:.2f} s ({stats.images_per_s:.2f} img/s)")
    for error in stats.errors[:20]:
        print(f"  {error}", file=sys.stderr)
    if len(stats.errors) > 20:
        print(f"  ... and {len(stats.errors) - 20} more (see manifest.jsonl)", file=sys.stderr)
    return stats.exit_status


async def _main(args: argparse.Namespace, lines: TextIO, terminated: list[int]):
    from tqdm import tqdm

    from entrypoints.batch import run_batch

    # SIGTERM (a scheduler preempting the job) stops like Ctrl-C: in-flight work is
    # aborted, finished images and rows stay, and the same command resumes.
    main_task = asyncio.current_task()
    assert main_task is not None

    def on_sigterm() -> None:
        terminated.append(signal.SIGTERM)
        main_task.cancel()

    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):  # not on this platform / thread
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    progress = tqdm(total=0, unit="img", desc="images", disable=args.no_progress, dynamic_ncols=True)
    try:
        return await run_batch(lines, Path(args.output_dir), engine_options=engine_options_from_args(args),
                               max_in_flight=args.max_in_flight, progress=progress)
    finally:
        progress.close()
