"""The serving benchmark: its statistics helper, and the client against a stub OpenAI-style server."""

import asyncio
import base64
import json
import math

import pytest
from aiohttp import web

from benchmarks import benchmark_serving as bench
from benchmarks import workloads
from engine.sim.report import RequestRecord
from engine.sim.workload import WorkloadRequest


def outcome(label, arrival, latency, deadline=None, error=None):
    return bench.Outcome(RequestRecord(label, arrival, latency, deadline), error)


def test_summarize_reports_mean_median_tails_and_attainment():
    outcomes = [outcome("S", 0.0, 1.0, 2.0), outcome("S", 1.0, 1.0, 2.0), outcome("S", 2.0, 1.0, 2.0),
                outcome("L", 3.0, 9.0, 5.0), outcome("L", 4.0, None, 5.0, error="HTTP 500")]
    m = bench.summarize(outcomes)
    assert m.latency.mean == 3.0 and m.latency.p50 == 1.0  # mean and median differ here
    assert m.latency.p90 == pytest.approx(6.6) and m.latency.p99 == pytest.approx(8.76)  # numpy: 1 + 0.7 * 8
    assert m.slo_attainment == pytest.approx(3 / 5)
    assert m.class_attainment == {"L": 0.0, "S": 1.0}
    assert m.failed == 1 and m.throughput == pytest.approx(4 / 12.0)


def test_the_body_carries_the_api_fields_and_gfdit_extensions():
    w = WorkloadRequest(3, 1.5, "S", 256, 128, 8, 2, 4.5, seed=11, prompt="a fox", priority=2)
    assert bench.request_body(w, "small-pixart") == {
        "prompt": "a fox", "n": 2, "size": "256x128", "response_format": "b64_json", "num_inference_steps": 8,
        "seed": 11, "priority": 2, "deadline_s": 4.5, "model": "small-pixart"}
    no_slo = WorkloadRequest(0, 0.0, "S", 64, 64, 1, 1, None, 0, "p")
    assert "deadline_s" not in bench.request_body(no_slo) and "model" not in bench.request_body(no_slo)


@pytest.fixture
async def stub_server():
    """Answers like the images API: sleeps 1 ms per 64x64 tile, then n base64 images; 'fail' prompts get a 400."""
    seen = []

    async def generate(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        if "fail" in body["prompt"]:
            return web.json_response({"error": {"message": "bad prompt", "type": "invalid_request_error",
                                                "param": "prompt", "code": None}}, status=400)
        width, height = (int(v) for v in body["size"].split("x"))
        await asyncio.sleep(0.001 * width * height / 4096)
        image = base64.b64encode(b"\x89PNG fake").decode()
        return web.json_response({"created": 0, "data": [{"b64_json": image}] * body["n"]})

    app = web.Application()
    app.router.add_post("/v1/images/generations", generate)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", seen
    await runner.cleanup()


async def test_replay_sends_each_request_at_its_arrival_and_records_the_outcome(stub_server):
    base_url, seen = stub_server
    workload = [WorkloadRequest(i, 0.02 * i, "S" if i % 2 else "L", 64 if i % 2 else 256, 64 if i % 2 else 256,
                                2, 1 + i % 2, 0.005 if i % 2 else 5.0, seed=i, prompt=f"p{i}") for i in range(6)]
    workload.append(WorkloadRequest(6, 0.05, "S", 64, 64, 2, 1, 1.0, seed=6, prompt="fail please"))
    outcomes = await bench.replay(base_url, workload, model="stub")
    assert len(seen) == 8 and seen[0]["prompt"] == "warm-up"  # the warm-up goes first, uncounted
    assert [o.record.label for o in outcomes] == [w.label for w in workload]
    ok = outcomes[:6]
    assert all(o.error is None and o.record.latency_s > 0 for o in ok)
    assert all(o.record.arrival_s >= w.arrival_s - 1e-3 for o, w in zip(ok, workload))
    assert all(o.record.latency_s >= 0.016 for o, w in zip(ok, workload) if w.label == "L")  # 16 tiles slept
    assert outcomes[6].error == "HTTP 400: bad prompt" and outcomes[6].record.latency_s is None
    figures = bench.figures("stub", base_url, "wl.jsonl", outcomes)
    assert figures["completed"] == 6 and figures["failed"] == 1
    assert figures["class_attainment"]["L"] == 1.0  # 5 s deadlines
    assert math.isclose(figures["slo_attainment"], sum(o.record.met for o in outcomes) / 7)


async def test_main_end_to_end(stub_server, tmp_path, capsys):
    base_url, _ = stub_server
    wl = tmp_path / "wl.jsonl"
    assert workloads.main(["--profile", "h20_qwen_image", "--classes", "S:64x64:1:3:2", "--saturate", "3",
                           "-o", str(wl)]) == 0
    out = tmp_path / "run.json"
    rc = await asyncio.to_thread(bench.main, ["--base-url", base_url, "--workload", str(wl), "--label", "elastic",
                                              "--json", str(out)])
    assert rc == 0
    run = json.loads(out.read_text())
    assert run["label"] == "elastic" and run["completed"] == 3 and len(run["requests"]) == 3
    for key in ("throughput", "mean_latency_s", "p50_latency_s", "p90_latency_s", "p99_latency_s", "slo_attainment"):
        assert isinstance(run[key], float)
    sim = tmp_path / "sim.json"
    sim.write_text(json.dumps({"policies": {"elastic": {**run, "mean_latency_s": run["mean_latency_s"] * 1.1}}}))
    capsys.readouterr()
    assert bench.main(["--report", str(out), "--simulated", str(sim)]) == 0
    printed = capsys.readouterr().out
    assert "elastic (real)" in printed and "elastic (simulated)" in printed
    assert "+10% off the real one" in printed
