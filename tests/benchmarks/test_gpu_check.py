"""benchmarks/gpu_check.sh: it parses, refuses bad usage, and its dry run runs every step.

The dry run is the GPU run's plan at tiny sizes on the CPU: the same scripts, the same
model folder, the same pytest selection (whose gpu tests must skip cleanly here) and the
same report, so a change that would break the run on a lent GPU machine fails here first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ["env", "model", "tests", "throughput", "overhead", "tflops", "cache", "compile"]


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_wheels.sh"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], check=True)


@pytest.mark.parametrize("args", [[], ["out", "--gpu"], ["out", "--dry-run", "more"]])
def test_bad_usage_is_one_line_and_exit_2(args, tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "usage: bash benchmarks/gpu_check.sh OUT_DIR [--dry-run]"


@pytest.mark.slow  # about 110 s of CPU: outside the default run, `pytest -m slow` runs it
@pytest.mark.timeout(1500)  # seven fresh Python processes; minutes on a shared 2-core CPU
def test_dry_run_runs_every_step_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_BUDGET_S": "1400", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", str(SCRIPT), str(out), "--dry-run"], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # The plan is listed first: the GPU commands at their real sizes.
    plan = done.stdout.split("gpu_check: dry run")[0]
    assert "--size 1024 --batch 4" in plan and "--num-requests 16" in plan and "--device cuda" in plan
    assert "benchmark_cache.py" in plan and "--thresholds 0.1,0.2" in plan
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log"]

    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    assert [s["name"] for s in report["steps"]] == STEPS
    assert all(s["status"] == "ok" for s in report["steps"]), [(s["name"], s["status"]) for s in report["steps"]]
    figures = {s["name"]: s.get("figures", {}) for s in report["steps"]}
    assert report["env"]["cuda_available"] is False and report["env"]["packages"]["torch"]
    assert figures["throughput"]["engine_img_s"] > 0 and figures["throughput"]["num_requests"] == 2
    assert figures["overhead"]["transformer_call_ms"] > 0 and figures["overhead"]["step_vs_transformer_ratio"] > 0
    assert figures["tflops"]["flops"] > 0 and figures["tflops"]["matmul_flops"] > 0
    assert figures["tflops"]["attention_flops"] > 0
    assert {"compile_speedup", "compile_time_s", "recompiles"} <= set(figures["compile"])
    assert {"wall_speedup", "row_step_reduction", "psnr_db"} <= set(figures["cache"]["recommended"])

    # Every gpu test was collected and skipped cleanly for want of CUDA.
    tests = report["tests"]
    assert tests["failed"] == tests["error"] == tests["passed"] == 0
    assert tests["skipped"] >= 12
    assert all(t["outcome"] == "skipped" for t in tests["tests"])
    assert {t["test"].split("::")[0].rsplit(".", 1)[-1] for t in tests["tests"]} >= {
        "test_cuda_families", "test_cuda_xformers", "test_nvml_cuda", "test_compile"}
