"""`gfdit simulate` end to end on a short window (pure Python, a few seconds)."""

import json
import subprocess
import sys

from engine.sim.workload import Phase, RequestClass, generate, save_jsonl
from tests.scheduling_helpers import h20


def simulate(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "entrypoints.cli", "simulate", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_simulate_prints_every_policy_and_writes_the_figures(tmp_path):
    out = tmp_path / "sim.json"
    result = simulate("--duration", "300", "--saturate", "12", "--json", str(out))
    assert result.returncode == 0, result.stderr
    for name in ("static-1", "static-2", "static-4", "fcfs", "srtf", "edf", "elastic"):
        assert f"\n{name} " in result.stdout
    assert "elastic vs static-4" in result.stdout and "6.01x" in result.stdout
    figures = json.loads(out.read_text())
    assert set(figures["policies"]) == {"static-1", "static-2", "static-4", "fcfs", "srtf", "edf", "elastic"}
    elastic = figures["policies"]["elastic"]
    for key in ("throughput", "mean_latency_s", "p95_latency_s", "slo_attainment", "saturated_throughput"):
        assert isinstance(elastic[key], float), key
    assert set(elastic["class_attainment"]) == {"S", "M", "L"}
    # Within one L request (77.85 s of work over 4 GPUs x 300 s) of the target.
    assert abs(figures["config"]["offered_load"] - 1.1) <= 0.07
    assert figures["comparison"]["elastic"]["baseline"] == "static-4"
    assert figures["saturated_throughput_bound_x"] > 1 and figures["paper"]["throughput_x"] == 6.01


def test_simulate_replays_a_workload_file_with_chosen_policies(tmp_path):
    cm = h20()
    path = tmp_path / "wl.jsonl"
    save_jsonl(generate([RequestClass("S", 512, 512, 1.0, 2.0, steps=5)], cm, num_gpus=2,
                        phases=[Phase(60, 0.5)], seed=1), path)
    out = tmp_path / "sim.json"
    result = simulate("--num-gpus", "2", "--workload", str(path), "--saturate", "0",
                      "--policies", "static-1,elastic,engine.scheduler.policies:SRTFPolicy", "--json", str(out))
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    assert set(figures["policies"]) == {"static-1", "elastic", "engine.scheduler.policies:SRTFPolicy"}
    assert "saturated_throughput" not in figures["policies"]["elastic"]


def test_simulate_reports_bad_input():
    result = simulate("--profile", "no_such_profile")
    assert result.returncode == 2 and "no shipped profile" in result.stderr
    result = simulate("--policies", "nope", "--duration", "10", "--saturate", "0")
    assert result.returncode == 2 and "unknown policy" in result.stderr


def test_simulate_averages_several_seeds(tmp_path):
    out = tmp_path / "sim.json"
    result = simulate("--duration", "120", "--saturate", "0", "--seeds", "3", "--policies", "static-4,elastic",
                      "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "mean over seeds 0..2" in result.stdout
    elastic = json.loads(out.read_text())["policies"]["elastic"]
    assert len(elastic["per_seed"]) == 3
    runs = [run["mean_latency_s"] for run in elastic["per_seed"]]
    assert elastic["mean_latency_s"] == sum(runs) / 3 and len(set(runs)) > 1


def test_simulate_with_interference_prints_blind_and_telemetry_runs_side_by_side(tmp_path):
    out = tmp_path / "sim.json"
    result = simulate("--duration", "600", "--load", "0.8", "--saturate", "0", "--policies", "static-4,edf",
                      "--interference", "1:100:400", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "interference: GPU 1 shared with a foreign job at 100 % from 100 s to 400 s" in result.stdout
    assert "\nedf+telemetry " in result.stdout
    figures = json.loads(out.read_text())
    assert set(figures["policies"]) == {"static-4", "edf", "static-4+telemetry", "edf+telemetry"}
    side = figures["interference"]
    assert (side["gpu"], side["start_s"], side["end_s"], side["util"], side["speed"]) == (1, 100, 400, 100, 0.5)
    edf = side["policies"]["edf"]
    assert set(edf) == {"blind", "telemetry"}
    assert set(edf["blind"]) == {"slo_attainment", "window_slo_attainment", "mean_latency_s", "p95_latency_s"}
    assert edf["telemetry"]["window_slo_attainment"] > edf["blind"]["window_slo_attainment"]
    assert figures["policies"]["edf"]["window_slo_attainment"] == edf["blind"]["window_slo_attainment"]
    bad = simulate("--interference", "7:0:10", "--duration", "10", "--saturate", "0")
    assert bad.returncode == 2 and "not one of the 4 GPUs" in bad.stderr
