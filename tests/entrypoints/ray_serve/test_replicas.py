"""Two engine replicas on a local Ray cluster behind the API server, driven over real HTTP.

The tests share one cluster (``ray_cluster``) and run in file order: the last one shuts it
down and checks that no process of it is left.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from engine.params import ImageParams
from entrypoints.api_server import APIServer, ServerConfig
from tests.helpers import pipeline_reference

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

REPLICA_HEADER = "x-gfdit-replica"


def sdk(cluster) -> openai.OpenAI:
    # No SDK retries: every 5xx must be seen as it is.
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def replica_counts(url: str, outcome: str = "finished") -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(url + "/metrics").read().decode()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "gfdit_replica_requests":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels["outcome"] == outcome:
                    counts[sample.labels["replica"]] = sample.value
    return counts


def metric(url: str, name: str, **labels: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(url + "/metrics").read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and labels.items() <= s.labels.items())


def test_openai_sdk_gets_pipeline_images_from_both_replicas(ray_cluster, preset_pipelines):
    client = sdk(ray_cluster)
    replicas = set(ray_cluster.statuses())
    before = replica_counts(ray_cluster.url)

    def one(seed: int) -> tuple[str, bytes]:
        raw = client.images.with_raw_response.generate(
            prompt="a red fox", size="64x64", extra_body={"num_inference_steps": 4, "seed": seed})
        return raw.headers[REPLICA_HEADER], base64.b64decode(raw.parse().data[0].b64_json)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, [7] * 8))
    served = [replica for replica, _ in results]
    assert set(served) == replicas, f"requests went to {served}, replicas are {replicas}"

    # The same seed on either replica gives the plain pipeline's image.
    params = ray_cluster.client.resolve_params(ImageParams(width=64, height=64, num_inference_steps=4, seed=7))
    _, ref_pixels = pipeline_reference(preset_pipelines("tiny-pixart"), "a red fox", params)
    for _, png in results:
        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        assert np.abs(pixels.astype(int) - ref_pixels[0].astype(int)).max() <= 1

    # /metrics counts what each replica served, as the headers said.
    after = replica_counts(ray_cluster.url)
    for replica in replicas:
        assert after.get(replica, 0) - before.get(replica, 0) == served.count(replica)


def test_stream_with_partial_images_through_serve(ray_cluster):
    client = sdk(ray_cluster)
    events = list(client.images.generate(prompt="a blue cat", size="64x64", stream=True, partial_images=2,
                                         extra_body={"num_inference_steps": 4, "seed": 3}))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    plain = client.images.generate(prompt="a blue cat", size="64x64", extra_body={"num_inference_steps": 4, "seed": 3})
    assert events[-1].b64_json == plain.data[0].b64_json


async def test_disconnect_aborts_the_request_on_its_replica(ray_cluster):
    aborted_before = metric(ray_cluster.url, "gfdit_requests_total", outcome="aborted")
    body = {"prompt": "a long one", "size": "256x256", "stream": True, "partial_images": 3,
            "num_inference_steps": 200, "seed": 1}
    async with aiohttp.ClientSession() as session:
        reply = await session.post(ray_cluster.url + "/v1/images/generations", json=body)
        assert reply.status == 200
        async for line in reply.content:  # the stream is live through Serve: a partial image arrives
            if line.startswith(b"event: image_generation.partial_image"):
                break
        holders = [s for s in (await asyncio.to_thread(ray_cluster.statuses)).values() if s.unfinished]
        assert len(holders) == 1 and holders[0].running == 1
        reply.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 20
    while any(s.unfinished for s in (await asyncio.to_thread(ray_cluster.statuses)).values()):
        assert time.monotonic() < deadline, "the replica still holds the request after the client left"
        await asyncio.sleep(0.1)
    assert ray_cluster.client.num_unfinished == 0
    assert metric(ray_cluster.url, "gfdit_requests_total", outcome="aborted") == aborted_before + 1


async def test_queue_bound_answers_429_through_replicas(ray_cluster):
    server = APIServer(ray_cluster.client, ServerConfig(port=0, max_queue=1))
    await asyncio.wrap_future(ray_cluster._runner.submit(server.start()))
    try:
        async with aiohttp.ClientSession() as session:
            url = server.url + "/v1/images/generations"
            first = asyncio.create_task(session.post(url, json={"prompt": "a", "size": "64x64",
                                                                "num_inference_steps": 30}))
            while ray_cluster.client.num_unfinished == 0:
                await asyncio.sleep(0.01)
            async with session.post(url, json={"prompt": "b", "size": "64x64"}) as refused:
                assert refused.status == 429 and refused.headers["Retry-After"] == "1"
                assert (await refused.json())["error"]["code"] == "queue_full"
            async with await first as reply:
                assert reply.status == 200
    finally:
        await asyncio.wrap_future(ray_cluster._runner.submit(server.stop()))


def test_api_server_as_a_serve_app_in_front_of_the_same_replicas(ray_cluster):
    """What a KubeRay RayService deploys: the API server in an actor, attached to the replicas."""
    from ray import serve

    from entrypoints.ray_serve.frontend import app_builder

    app = app_builder({"replicas_app": ray_cluster.client.app_name, "server": {"port": 0},
                       "ray_actor_options": {"num_cpus": 0}})
    handle = serve.run(app, name="gfdit-api", route_prefix=None)
    try:
        url = handle.url.remote().result(timeout_s=60)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        raw = client.images.with_raw_response.generate(prompt="a blue cat", size="64x64",
                                                       extra_body={"num_inference_steps": 4, "seed": 3})
        assert raw.headers[REPLICA_HEADER] in ray_cluster.statuses()
        direct = sdk(ray_cluster).images.generate(prompt="a blue cat", size="64x64",
                                                  extra_body={"num_inference_steps": 4, "seed": 3})
        assert raw.parse().data[0].b64_json == direct.data[0].b64_json
    finally:
        serve.delete("gfdit-api")
    assert ray_cluster.client.replica_states().get("RUNNING") == 2  # deleting it left the replicas alone


async def test_killed_replica_mid_request_every_request_ends_and_serve_restarts_it(ray_cluster):
    import psutil

    url = ray_cluster.url + "/v1/images/generations"
    retries_before = metric(ray_cluster.url, "gfdit_replica_retries_total")
    body = {"prompt": "a fox", "size": "128x128", "num_inference_steps": 200}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:

        async def post(seed: int) -> tuple[int, dict]:
            async with session.post(url, json={**body, "seed": seed}) as reply:
                return reply.status, await reply.json()

        async def stream(seed: int) -> list[tuple[str, dict]]:
            async with session.post(url, json={**body, "seed": seed, "stream": True, "partial_images": 3}) as reply:
                assert reply.status == 200
                return parse_sse(await reply.text())

        # JSON and streamed requests, all at once, long enough that both replicas hold some.
        requests = [asyncio.create_task(post(seed) if seed % 2 == 0 else stream(seed)) for seed in range(8)]
        deadline = time.monotonic() + 90
        while True:
            statuses = await asyncio.to_thread(ray_cluster.statuses)
            if all(s.unfinished for s in statuses.values()):
                break
            assert time.monotonic() < deadline, (statuses, [t.done() for t in requests])
            await asyncio.sleep(0.2)
        victim = sorted(statuses, key=lambda r: -statuses[r].unfinished)[0]
        actor = ray.get_actor(f"SERVE_REPLICA::{ray_cluster.client.app_name}#EngineReplica#{victim}",
                              namespace="serve")
        ray.kill(actor, no_restart=True)

        answers = await asyncio.wait_for(asyncio.gather(*requests), 240)
        for answer in answers:  # every request ends: retried elsewhere, or a clear 503
            if isinstance(answer, list):  # a stream: partial images never repeat, then one image or an error
                kinds = [kind for kind, _ in answer]
                partials = [data["partial_image_index"] for kind, data in answer if kind.endswith("partial_image")]
                assert partials == sorted(set(partials)) and len(partials) <= 3, answer
                if kinds[-1] == "error":
                    assert answer[-1][1]["error"]["code"] == "engine_unavailable"
                else:
                    assert kinds.count("image_generation.completed") == 1 and kinds[-1].endswith("completed")
                continue
            status, reply_body = answer
            if status == 200:
                image = Image.open(io.BytesIO(base64.b64decode(reply_body["data"][0]["b64_json"])))
                assert image.size == (128, 128)
            else:
                assert status == 503 and reply_body["error"]["code"] == "engine_unavailable", reply_body
        assert metric(ray_cluster.url, "gfdit_replica_retries_total") > retries_before

        # The replica's process and its engine's worker are gone.
        _, alive = psutil.wait_procs([psutil.Process(p) for p in statuses[victim].pids if psutil.pid_exists(p)],
                                     timeout=30)
        assert not alive

        # Serve brings a new replica up; then both serve again.
        deadline = time.monotonic() + 240
        while ray_cluster.client.replica_states().get("RUNNING") != 2:
            assert time.monotonic() < deadline, ray_cluster.client.replica_states()
            await asyncio.sleep(0.5)
        replicas = set(await asyncio.to_thread(ray_cluster.statuses))
        assert victim not in replicas and len(replicas) == 2
        later = await asyncio.gather(*(post(seed) for seed in range(4)))
        assert [status for status, _ in later] == [200] * 4
    async with aiohttp.ClientSession() as session, session.get(ray_cluster.url + "/health") as reply:
        assert reply.status == 200


def parse_sse(text: str) -> list[tuple[str, dict]]:
    import json

    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def test_shutdown_leaves_no_ray_process_behind(ray_cluster):
    import psutil

    processes = ray_cluster.descendants()
    names = " ".join(p.name() for p in processes)
    assert "raylet" in names and "gcs_server" in names  # the cluster is this test session's own
    ray_cluster.close()
    assert not ray.is_initialized()
    _, alive = psutil.wait_procs(processes, timeout=60)
    assert not alive, [(p.pid, p.name()) for p in alive]
