"""Engine replicas on Ray Serve: 2 replicas against 1, and what the front end adds.

    python benchmarks/benchmark_replicas.py --json replicas.json

Starts its own local Ray cluster (``--num-cpus``, 2; no dashboard, no usage stats) and,
in this process, the API server in front of the replicas.

1. scaling: the same --num-requests (32) requests (--model small-pixart, --size 256,
   --steps 4, seeds 0..N-1) sent at once over HTTP to the API server, once in front of 1
   replica and once in front of 2. Each replica is one CPU worker process with one torch
   thread (one placement-group bundle of 1 CPU). Each side is timed after a warm-up of one
   request on every replica. ``two_vs_one`` = img/s with 2 replicas / img/s with 1. Target
   >= 1.7x on a 2-core machine. Also reported: how Serve spread the requests, and the CPU
   cores the cluster's processes got during each side (load from elsewhere on a shared
   machine caps the ratio).
2. front-end overhead: --overhead-requests (60) requests one at a time on tiny-pixart
   64x64, 2 steps, alternating between a direct ``AsyncEngine`` in this process and the API
   server over HTTP in front of 1 replica (the same engine options: one worker process with
   one torch thread). ``frontend_overhead_ms`` = the median over rounds of (latency through
   the front end - latency direct); ``frontend_overhead_fastest_ms`` the same from each
   side's fastest request. Target <= 5 ms. ``serve_overhead_ms``: the same through the
   Ray client alone (no HTTP), so the two parts of the cost can be told apart.

JSON keys (--json PATH): two_vs_one, one_replica_img_s, two_replica_img_s,
one_replica_s, two_replica_s, requests_by_replica (per replica count, 2-replica side),
one_replica_cores, two_replica_cores, two_vs_one_per_core (img/s per core the cluster got,
2 replicas over 1), frontend_overhead_ms, serve_overhead_ms,
frontend_overhead_fastest_ms, direct_latency_ms, frontend_latency_ms, serve_latency_ms (medians), load_average (the
machine's 1-minute load before and after), config.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections import Counter
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import aiohttp  # noqa: E402
import psutil  # noqa: E402

from benchmarks.common import print_table, write_json  # noqa: E402
from engine.async_engine import AsyncEngine  # noqa: E402
from engine.params import ImageParams  # noqa: E402
from entrypoints.api_server import APIServer, ServerConfig  # noqa: E402
from entrypoints.ray_serve import RayEngineClient, ReplicaOptions  # noqa: E402
from entrypoints.serving_images import REPLICA_HEADER  # noqa: E402


async def deploy(engine_options: dict[str, Any], replicas: int, name: str) -> tuple[RayEngineClient, APIServer]:
    client = await RayEngineClient.create(engine_options, ReplicaOptions(num_replicas=replicas), app_name=name)
    server = APIServer(client, ServerConfig(port=0, max_queue=1024))
    await server.start()
    return client, server


async def undeploy(client: RayEngineClient, server: APIServer) -> None:
    await server.stop()
    await client.shutdown()


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> str:
    async with session.post(url + "/v1/images/generations", json=body) as reply:
        if reply.status != 200:
            raise RuntimeError(f"HTTP {reply.status}: {await reply.text()}")
        await reply.read()
        return reply.headers.get(REPLICA_HEADER, "?")


def cluster_cpu_seconds() -> float:
    total = 0.0
    for process in psutil.Process().children(recursive=True):
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


async def scaling_side(args: argparse.Namespace, replicas: int) -> dict[str, Any]:
    options = {"model": args.model, "device": "cpu", "worker_threads": 1}
    client, server = await deploy(options, replicas, f"bench-{replicas}")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
            body = {"prompt": "a red fox in the snow", "size": f"{args.size}x{args.size}",
                    "num_inference_steps": args.steps}
            warmed: set[str] = set()
            for _ in range(20):  # warm every replica up (Serve picks which one answers)
                warmed.update(await asyncio.gather(*(post(session, server.url, {**body, "seed": 1000 + k})
                                                     for k in range(replicas))))
                if len(warmed) == replicas:
                    break
            cpu0, start = cluster_cpu_seconds(), time.perf_counter()
            served = await asyncio.gather(*(post(session, server.url, {**body, "seed": k})
                                            for k in range(args.num_requests)))
            elapsed = time.perf_counter() - start
            cores = (cluster_cpu_seconds() - cpu0) / elapsed
    finally:
        await undeploy(client, server)
    return {"seconds": elapsed, "img_s": args.num_requests / elapsed, "by_replica": dict(Counter(served)),
            "cores": cores}


async def overhead(args: argparse.Namespace) -> dict[str, float]:
    options = {"model": "tiny-pixart", "device": "cpu", "worker_threads": 1}
    params = ImageParams(width=64, height=64, num_inference_steps=2, seed=1)
    body = {"prompt": "a red fox", "size": "64x64", "num_inference_steps": 2, "seed": 1}
    direct = await AsyncEngine.create(**options)
    client, server = await deploy(options, 1, "bench-overhead")
    times: dict[str, list[float]] = {"direct": [], "frontend": [], "serve": []}
    try:
        async with aiohttp.ClientSession() as session:

            async def via_direct() -> None:
                async for _ in direct.generate("a red fox", params, progress=False):
                    pass

            async def via_serve() -> None:
                async for _ in client.generate("a red fox", params, progress=False):
                    pass

            async def via_frontend() -> None:
                await post(session, server.url, body)

            sides = {"direct": via_direct, "frontend": via_frontend, "serve": via_serve}
            for k in range(args.overhead_requests + 3):
                for name, call in sides.items():
                    start = time.perf_counter()
                    await call()
                    if k >= 3:  # the first few warm every path up
                        times[name].append((time.perf_counter() - start) * 1000)
    finally:
        await undeploy(client, server)
        await direct.shutdown()
    medians = {name: statistics.median(values) for name, values in times.items()}

    def added(name: str) -> float:
        # Paired by round: a burst of load from elsewhere hits both sides of a pair alike.
        return statistics.median(t - d for t, d in zip(times[name], times["direct"]))

    return {"direct_latency_ms": medians["direct"], "frontend_latency_ms": medians["frontend"],
            "serve_latency_ms": medians["serve"], "frontend_overhead_ms": added("frontend"),
            "serve_overhead_ms": added("serve"),
            "frontend_overhead_fastest_ms": min(times["frontend"]) - min(times["direct"])}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    load_before = os.getloadavg()[0]
    try:
        figures: dict[str, Any] = {}
        if args.only in (None, "scaling"):
            one = await scaling_side(args, 1)
            two = await scaling_side(args, 2)
            figures.update(two_vs_one=two["img_s"] / one["img_s"], one_replica_img_s=one["img_s"],
                           two_replica_img_s=two["img_s"], one_replica_s=one["seconds"],
                           two_replica_s=two["seconds"], requests_by_replica=two["by_replica"],
                           one_replica_cores=one["cores"], two_replica_cores=two["cores"],
                           two_vs_one_per_core=(two["img_s"] / two["cores"]) / (one["img_s"] / one["cores"]))
        if args.only in (None, "overhead"):
            figures.update(await overhead(args))
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    figures["load_average"] = [load_before, os.getloadavg()[0]]
    figures["config"] = {k: v for k, v in vars(args).items() if k != "json"}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small-pixart")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--overhead-requests", type=int, default=60)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--only", choices=["scaling", "overhead"], default=None)
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    figures = asyncio.run(main_async(args))
    write_json(args.json, figures)
    rows = [("measure", "result", "target")]
    if "two_vs_one" in figures:
        rows += [("two_vs_one", f"{figures['two_vs_one']:.2f}x ({figures['two_replica_img_s']:.2f} vs "
                                f"{figures['one_replica_img_s']:.2f} img/s)", ">= 1.7x"),
                 ("requests_by_replica", str(figures["requests_by_replica"]), ""),
                 ("cluster cores, 1 / 2 replicas", f"{figures['one_replica_cores']:.2f} / "
                                                  f"{figures['two_replica_cores']:.2f}", ""),
                 ("two_vs_one_per_core", f"{figures['two_vs_one_per_core']:.2f}x", "")]
    if "frontend_overhead_ms" in figures:
        rows += [("frontend_overhead_ms", f"{figures['frontend_overhead_ms']:.1f} ms "
                                          f"({figures['frontend_latency_ms']:.1f} vs "
                                          f"{figures['direct_latency_ms']:.1f} ms)", "<= 5 ms"),
                 ("frontend_overhead_fastest_ms", f"{figures['frontend_overhead_fastest_ms']:.1f} ms", ""),
                 ("serve_overhead_ms (no HTTP)", f"{figures['serve_overhead_ms']:.1f} ms", "")]
    rows.append(("load average before / after", " / ".join(f"{v:.1f}" for v in figures["load_average"]), ""))
    print_table("Engine replicas on Ray Serve", rows)


if __name__ == "__main__":
    main()
