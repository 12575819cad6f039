import subprocess
import sys

from PIL import Image


def test_gfdit_generate_writes_the_image(tmp_path):
    target = tmp_path / "fox.png"
    result = subprocess.run(
        [sys.executable, "-m", "entrypoints.cli", "generate", "a red fox", "-o", str(target),
         "--size", "96x64", "--steps", "3", "--seed", "7", "--model", "tiny-flux"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "seed 7" in result.stdout
    assert Image.open(target).size == (96, 64)


def test_gfdit_generate_reports_bad_input(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "entrypoints.cli", "generate", "a fox", "-o", str(tmp_path / "x.png"),
         "--size", "65", "--model", "tiny-flux", "--executor", "inprocess"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "width must be a multiple of 16" in result.stderr


def test_every_flag_of_every_command_has_a_help_text():
    import argparse

    from entrypoints.cli import COMMANDS, build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == set(COMMANDS)
    missing = [f"{name} {action.option_strings or action.dest}"
               for name, p in [("gfdit", parser), *subparsers.choices.items()]
               for action in p._actions
               if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
               and not (action.help or "").strip()]
    assert not missing, f"flags without a help text: {missing}"
