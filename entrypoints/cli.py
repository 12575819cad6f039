"""``gfdit``: the command line. Each sub-command lives in its own module and registers here."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from engine.config import add_engine_args, engine_options_from_args

# name -> (module, help); the module has add_arguments(parser) and run(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("entrypoints.cli_generate", "generate images for one prompt and save them"),
    "serve": ("entrypoints.cli_serve", "serve the OpenAI-compatible images API over HTTP"),
    "batch": ("entrypoints.cli_batch", "generate every line of a JSONL file (resumable)"),
    "simulate": ("entrypoints.cli_simulate", "compare scheduling policies on a simulated cluster"),
    "profile": ("entrypoints.cli_profile", "measure stage times on this machine and write a cost-model profile"),
}


def parse_size(text: str) -> tuple[int, int]:
    """'512' or '768x512' (width x height)."""
    try:
        if "x" in text:
            width, height = (int(v) for v in text.lower().split("x"))
        else:
            width = height = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N or WxH, got {text!r}") from None
    return width, height


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="gfdit", description="Serve and run Diffusion Transformer image models.")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="how much the engine logs to stderr (default: info)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run: Callable[[argparse.Namespace], int] = args.run
    from engine.executor.worker_handle import WorkerStartError

    try:
        return run(args)
    except WorkerStartError as exc:  # the workers could not start: one line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1


__all__ = ["add_engine_args", "engine_options_from_args", "main", "parse_size"]

if __name__ == "__main__":
    sys.exit(main())
