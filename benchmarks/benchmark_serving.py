"""Replay a workload against a running gfdit server over HTTP; report throughput, latency and SLOs.

The real-run comparison (2 CPU workers, small-pixart, 256/512 mix): measure the machine,
draw one workload, serve it once per policy, then set the simulator's prediction for the
same workload and profile beside the real figures (labels must match the simulator's).

    gfdit profile small-pixart --num-workers 2 --worker-threads 1 -o cpu.json
    python benchmarks/workloads.py --profile cpu.json --num-gpus 2 --steps 10 \
        --classes S:256x256:0.5:1.5,L:512x512:0.5:3 --load 0.7 --duration 600 --seed 0 -o wl.jsonl
    gfdit serve small-pixart --num-workers 2 --policy elastic --profile cpu.json --port 8000
    python benchmarks/benchmark_serving.py --workload wl.jsonl --label elastic --json real-elastic.json
    # stop the server; serve again with --policy static --static-degree 1 (--label static-1),
    # then --static-degree 2 (--label static-2)
    gfdit simulate --profile cpu.json --num-gpus 2 --workload wl.jsonl --saturate 0 \
        --policies static-1,static-2,elastic --json sim.json
    python benchmarks/benchmark_serving.py --report real-elastic.json real-static-1.json \
        real-static-2.json --simulated sim.json

A warm-up request (the workload's first class) goes first and is not counted; then each
request is sent at its arrival time (seconds after the start), whatever the server is
doing, and its latency runs from sending to the full response. SLO: latency <= deadline_s.

Request body (POST /v1/images/generations, the OpenAI images API): ``prompt``, ``n``,
``size`` ("WxH"), ``response_format`` ("b64_json"), ``model`` when --model is given, and
gfdit's extensions ``num_inference_steps``, ``seed``, ``priority`` (integer, higher is
served first, default 0) and ``deadline_s`` (seconds after the server receives the
request by which the images should be done: a scheduling hint for deadline-aware
policies; a request that misses it still completes). The response must carry ``n``
entries in ``data[].b64_json``.

JSON (--json PATH): label, base_url, workload, requests (per request: label, arrival_s,
latency_s, deadline_s, images, error) and the metrics: throughput, image_throughput,
mean/p50/p90/p95/p99_latency_s, slo_attainment, class_attainment, class_mean_latency.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import aiohttp  # noqa: E402

from benchmarks.common import print_table  # noqa: E402
from engine.sim.report import RequestRecord, ServingMetrics, finite  # noqa: E402
from engine.sim.workload import WorkloadRequest, load_jsonl  # noqa: E402


@dataclass(frozen=True)
class Outcome:
    record: RequestRecord
    error: str | None = None


def request_body(w: WorkloadRequest, model: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": w.prompt, "n": w.n, "size": f"{w.width}x{w.height}",
                            "response_format": "b64_json", "num_inference_steps": w.steps, "seed": w.seed,
                            "priority": w.priority}
    if w.deadline_s is not None:
        body["deadline_s"] = w.deadline_s
    if model:
        body["model"] = model
    return body


async def send(session: aiohttp.ClientSession, url: str, w: WorkloadRequest, arrival_s: float,
               model: str | None = None, headers: dict[str, str] | None = None) -> Outcome:
    """One request; failures (HTTP errors, bad bodies, lost connections) are outcomes, not exceptions."""
    start = time.perf_counter()
    error = None
    try:
        async with session.post(url, json=request_body(w, model), headers=headers) as response:
            payload = await response.json(content_type=None)
            if response.status != 200:
                message = payload.get("error", {}).get("message") if isinstance(payload, dict) else None
                error = f"HTTP {response.status}: {message or payload}"
            else:
                data = payload.get("data") or []
                if len(data) != w.n or not all(base64.b64decode(d.get("b64_json") or "") for d in data):
                    error = f"expected {w.n} b64_json image(s), got {len(data)}"
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    latency = None if error else time.perf_counter() - start
    return Outcome(RequestRecord(w.label, arrival_s, latency, w.deadline_s, w.n), error)


async def replay(base_url: str, workload: list[WorkloadRequest], *, model: str | None = None,
                 api_key: str | None = None, timeout_s: float = 3600.0, warmup: bool = True) -> list[Outcome]:
    """Send every request at its arrival time; outcomes in workload order."""
    url = base_url.rstrip("/") + "/v1/images/generations"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        if warmup and workload:
            first = workload[0]
            warm = await send(session, url, WorkloadRequest(-1, 0.0, first.label, first.width, first.height,
                                                            first.steps, 1, None, 0, "warm-up"), 0.0, model, headers)
            if warm.error:
                raise RuntimeError(f"warm-up request failed: {warm.error}")
        start = time.perf_counter()

        async def at_arrival(w: WorkloadRequest) -> Outcome:
            await asyncio.sleep(max(0.0, start + w.arrival_s - time.perf_counter()))
            return await send(session, url, w, time.perf_counter() - start, model, headers)

        return await asyncio.gather(*(at_arrival(w) for w in workload))


def summarize(outcomes: list[Outcome]) -> ServingMetrics:
    """The statistics of a run (tested in tests/benchmarks/test_benchmark_serving.py)."""
    return ServingMetrics.of([o.record for o in outcomes])


def figures(label: str, base_url: str, workload: str, outcomes: list[Outcome]) -> dict[str, Any]:
    return {"label": label, "base_url": base_url, "workload": workload, **summarize(outcomes).to_dict(),
            "requests": [{**asdict(o.record), "error": o.error} for o in outcomes]}


def table(runs: dict[str, dict[str, Any]], classes: list[str]) -> list[tuple[str, ...]]:
    rows = [("run", "req/s", "mean s", "p50 s", "p90 s", "p99 s", "SLO", *(f"SLO {c}" for c in classes), "failed")]
    for name, f in runs.items():
        rows.append((name, _num(f.get("throughput"), 3), _num(f.get("mean_latency_s")), _num(f.get("p50_latency_s")),
                     _num(f.get("p90_latency_s")), _num(f.get("p99_latency_s")), _pct(f.get("slo_attainment")),
                     *(_pct(f.get("class_attainment", {}).get(c)) for c in classes), str(f.get("failed", "-"))))
    return rows


def report(real_files: list[str], simulated: str | None) -> None:
    """Real runs side by side, and the simulator's prediction for each policy beside them."""
    runs = {json.loads(Path(p).read_text())["label"]: json.loads(Path(p).read_text()) for p in real_files}
    classes = sorted({c for f in runs.values() for c in f.get("class_attainment", {})})
    shown = {f"{name} (real)": f for name, f in runs.items()}
    if simulated:
        predicted = json.loads(Path(simulated).read_text())["policies"]
        for name in runs:
            if name in predicted:
                shown[f"{name} (simulated)"] = predicted[name]
    print_table("real runs and the simulator's predictions", table(shown, classes))
    if simulated:
        print()
        for name, f in runs.items():
            if name in predicted and f.get("mean_latency_s"):
                error = predicted[name]["mean_latency_s"] / f["mean_latency_s"] - 1
                print(f"{name}: simulated mean latency {error:+.0%} off the real one (target: within 20%)")


def _num(value: Any, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _pct(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1%}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--workload", help="JSONL from benchmarks/workloads.py")
    parser.add_argument("--label", default="run", help="the name of this run (the server's policy)")
    parser.add_argument("--model", default=None, help="the model field to send (default: none, the server's)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per request")
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--report", nargs="+", default=None, help="print saved runs (JSON files) side by side")
    parser.add_argument("--simulated", default=None, help="with --report: gfdit simulate --json output to compare")
    args = parser.parse_args(argv)
    if args.report:
        report(args.report, args.simulated)
        return 0
    if not args.workload:
        parser.error("--workload is required (or --report)")
    workload = load_jsonl(args.workload)
    outcomes = asyncio.run(replay(args.base_url, workload, model=args.model, api_key=args.api_key,
                                  timeout_s=args.timeout, warmup=not args.no_warmup))
    result = figures(args.label, args.base_url, args.workload, outcomes)
    for o in outcomes:
        if o.error:
            print(f"failed: {o.record.label} at {o.record.arrival_s:.1f}s: {o.error}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(finite(result), indent=2) + "\n")
    classes = sorted({w.label for w in workload})
    print_table(f"serving: {len(workload)} requests from {args.workload} against {args.base_url}",
                table({args.label: result}, classes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
