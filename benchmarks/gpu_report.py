"""The JSON of benchmarks/gpu_check.sh: the machine, the test results, every step's figures.

    python benchmarks/gpu_report.py env PATH            # the machine and the packages, as JSON
    python benchmarks/gpu_report.py summary WORK OUT    # WORK's parts -> OUT/gpu_check.json + .log

``summary`` reads what the steps left in WORK: ``steps.jsonl`` (one line per step: name,
command, status ok / failed / timeout / skipped, exit code, seconds, why skipped), each
step's ``NAME.json`` (a benchmark's --json) and ``NAME.log``, ``tests.xml`` (pytest's
JUnit report). It writes one ``gpu_check.json``: ``env``, ``steps`` (each with its figures
and the tail of its log), ``tests`` (counts, and every test with its outcome, time and
skip or failure message), ``dry_run``, ``total_s``; and ``gpu_check.log``, every step's whole log. Two files, so the
results come back whole from a machine that returns at most eight.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "triton", "diffusers", "transformers", "tokenizers", "huggingface-hub", "msgspec",
            "xformers", "nvidia-ml-py", "numpy", "pytest", "pytest-asyncio")
LOG_TAIL_LINES = 40


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
        "packages": {}, "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
    }
    for name in PACKAGES:
        try:
            env["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env["packages"][name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["device"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                         "memory_gib": props.total_memory / 2**30, "multiprocessors": props.multi_processor_count,
                         "count": torch.cuda.device_count()}
        try:
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            env["nvidia_smi"] = f"unavailable: {exc}"
    return env


def junit(path: Path) -> dict[str, Any]:
    """pytest's JUnit XML as counts and one entry per test."""
    if not path.exists():
        return {"error": f"no test report ({path.name} missing)"}
    tests, counts = [], {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or child.text or "")[:2000]
        counts[outcome] += 1
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message})
    return {**counts, "tests": tests}


def summary(work: Path, out: Path) -> dict[str, Any]:
    steps = []
    for line in (work / "steps.jsonl").read_text().splitlines() if (work / "steps.jsonl").exists() else []:
        step = json.loads(line)
        figures, log = work / f"{step['name']}.json", work / f"{step['name']}.log"
        if figures.exists():
            try:
                step["figures"] = json.loads(figures.read_text())
            except json.JSONDecodeError as exc:
                step["figures"] = {"error": f"unreadable: {exc}"}
        if log.exists():
            step["log_tail"] = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        steps.append(step)
    env_path = work / "env.json"
    report = {
        "env": json.loads(env_path.read_text()) if env_path.exists() else None,
        "dry_run": (work / "dry_run").exists(),
        "steps": steps,
        "tests": junit(work / "tests.xml"),
        "total_s": sum(s.get("seconds", 0) for s in steps),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    with (out / "gpu_check.log").open("w") as combined:
        for step in steps:
            log = work / f"{step['name']}.log"
            combined.write(f"===== {step['name']}: {step['status']} ({step.get('seconds', 0):.0f} s)\n")
            combined.write(log.read_text(errors="replace") if log.exists() else "(no log)\n")
    return report


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "env":
        Path(sys.argv[2]).write_text(json.dumps(environment(), indent=2) + "\n")
    elif len(sys.argv) == 4 and sys.argv[1] == "summary":
        report = summary(Path(sys.argv[2]), Path(sys.argv[3]))
        width = max((len(s["name"]) for s in report["steps"]), default=4)
        print(f"\n{'step'.ljust(width)}  status   seconds")
        for step in report["steps"]:
            print(f"{step['name'].ljust(width)}  {step['status'].ljust(7)}  {step.get('seconds', 0):7.1f}")
        tests = report["tests"]
        if "error" not in tests:
            print(f"gpu tests: {tests['passed']} passed, {tests['failed']} failed, {tests['error']} errors, "
                  f"{tests['skipped']} skipped")
        cache = next((s.get("figures", {}) for s in report["steps"] if s["name"] == "cache"), {})
        if "recommended" in cache:
            best = cache["recommended"]
            print(f"step cache at threshold {best['threshold']:g}: wall speed-up {best['wall_speedup']:.2f}x, "
                  f"rows computed {best['row_step_reduction']:.2f}x fewer, PSNR {best['psnr_db']:.1f} dB")
        if any(s["status"] != "ok" for s in report["steps"]):
            sys.exit(1)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
