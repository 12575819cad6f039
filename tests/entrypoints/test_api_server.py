"""The images API server driven by the real openai SDK and real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import urllib.error
import urllib.request
import uuid

import openai
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.entrypoints.conftest import API_KEY

FAST = {"num_inference_steps": 3}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def test_b64_json_gives_n_images_of_the_asked_size(client):
    result = client.images.generate(model="tiny-pixart", prompt="a red fox", n=2, size="64x96",
                                    extra_body={**FAST, "seed": 5})
    assert len(result.data) == 2
    images = [png(d.b64_json) for d in result.data]
    assert all(image.format == "PNG" and image.size == (64, 96) for image in images)
    assert result.size == "64x96" and result.output_format == "png" and result.background == "opaque"
    assert result.usage.output_tokens == (64 // 16) * (96 // 16) * 2
    assert result.created > 0 and result.data[0].url is None


def test_seed_and_quality_reach_the_engine(client):
    """quality=low is a quarter of tiny-pixart's 20 default steps: the same image as 5 steps."""
    def one(**kw):
        return client.images.generate(prompt="a blue cat", size="64x64", **kw).data[0].b64_json

    low = one(quality="low", extra_body={"seed": 3})
    assert low == one(extra_body={"seed": 3, "num_inference_steps": 5})
    assert low != one(quality="medium", extra_body={"seed": 3})
    assert low != one(quality="low", extra_body={"seed": 4})


def test_output_format_and_the_model_alias(client):
    result = client.images.generate(model="pixart", prompt="a fox", size="64x64", output_format="jpeg",
                                    output_compression=50, extra_body=FAST)
    assert png(result.data[0].b64_json).format == "JPEG" and result.output_format == "jpeg"


def test_url_links_are_served_over_http_without_the_key(client):
    result = client.images.generate(prompt="a fox", n=2, size="96x64", response_format="url",
                                    output_format="webp", extra_body=FAST)
    bodies = set()
    for item in result.data:
        assert item.b64_json is None
        with urllib.request.urlopen(item.url, timeout=30) as reply:
            assert reply.headers["Content-Type"] == "image/webp"
            body = reply.read()
        bodies.add(body)
        assert Image.open(io.BytesIO(body)).size == (96, 64)
    assert len(bodies) == 2
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(result.data[0].url.rsplit("/", 1)[0] + "/nosuchimage.png", timeout=30)
    assert info.value.code == 404 and json.load(info.value)["error"]["code"] == "not_found"


def test_stream_yields_partial_images_then_the_completed_one(client):
    stream = client.images.generate(prompt="a fox", size="64x64", stream=True, partial_images=2,
                                    extra_body={"num_inference_steps": 6})
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for event in events:
        assert png(event.b64_json).size == (64, 64) and event.size == "64x64"
        assert event.output_format == "png"
    # Previews are real decodes of the latents along the way, not copies of the result.
    assert len({e.b64_json for e in events}) == 3
    assert events[-1].usage.output_tokens == 16


def test_stream_of_n_images_completes_each(client):
    events = list(client.images.generate(prompt="a fox", size="64x64", n=2, stream=True, partial_images=1,
                                         extra_body={"num_inference_steps": 4}))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"] * 2
    assert [e.partial_image_index for e in events[:2]] == [0, 0]


def test_models_lists_the_served_names(client):
    assert [m.id for m in client.models.list().data] == ["tiny-pixart", "pixart"]
    assert client.models.retrieve("pixart").owned_by == "gfdit"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("dall-e-3")


def test_unknown_model_is_404_and_bad_key_is_401(server, client):
    with pytest.raises(openai.NotFoundError) as info:
        client.images.generate(model="dall-e-3", prompt="a fox")
    assert info.value.body["param"] == "model" and info.value.body["code"] == "model_not_found"
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.images.generate(prompt="a fox")
    assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    status, body = post_json(server.url + "/v1/images/generations", {"prompt": "a fox"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


def test_bad_parameters_name_the_param(client):
    cases = [({"size": "7x9"}, "size"), ({"size": "65x64"}, "size"), ({"n": 11}, "n"),
             ({"background": "transparent"}, "background"), ({"quality": "ultra"}, "quality"),
             ({"extra_body": {"num_inference_steps": 5000}}, "num_inference_steps"),
             ({"extra_body": {"bogus": 1}}, "bogus")]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.images.generate(prompt="a fox", **kwargs)
        assert info.value.body["param"] == param, kwargs
        assert info.value.body["type"] == "invalid_request_error"


def test_every_answer_has_its_own_uuid4_request_id(client):
    ids = set()
    for _ in range(3):
        raw = client.images.with_raw_response.generate(prompt="a fox", size="64x64", extra_body={"num_inference_steps": 1})
        ids.add(raw.headers["x-request-id"])
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="", size="64x64")
    ids.add(info.value.response.headers["x-request-id"])
    assert len(ids) == 4 and all(uuid.UUID(i).version == 4 for i in ids)


def test_health_and_metrics_parse(server, client):
    with urllib.request.urlopen(server.url + "/health", timeout=30) as reply:
        assert reply.status == 200 and json.load(reply)["status"] == "ok"
    before_images = server.metric("gfdit_images_generated_total")
    before_rejected = server.metric("gfdit_requests_total", {"outcome": "rejected"})
    client.images.generate(prompt="a fox", n=3, size="64x64", extra_body=FAST)
    with pytest.raises(openai.BadRequestError):
        client.images.generate(prompt="a fox", size="abc")
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as reply:
        text = reply.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("gfdit_queue_depth", "gfdit_running_requests", "gfdit_requests", "gfdit_request_latency_seconds",
                 "gfdit_request_queue_wait_seconds", "gfdit_step_latency_seconds", "gfdit_images_generated"):
        assert name in families, name
    assert families["gfdit_request_latency_seconds"].type == "histogram"
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("gfdit_images_generated_total", ())] == before_images + 3
    assert samples[("gfdit_requests_total", (("outcome", "rejected"),))] == before_rejected + 1
    assert samples[("gfdit_step_latency_seconds_count", (("batch_size", "3"), ("degree", "1")))] >= 3
    assert samples[("gfdit_queue_depth", ())] == 0 and samples[("gfdit_running_requests", ())] == 0


# ----- disconnects, overload, health -----------------------------------------------------
async def open_request(server, body: dict, key: str | None = API_KEY):
    """Send a generation request over a raw socket; the caller closes it to disconnect."""
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    data = json.dumps(body).encode()
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    writer.write(f"POST /v1/images/generations HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"{auth}Content-Length: {len(data)}\r\n\r\n".encode() + data)
    await writer.drain()
    return reader, writer


LONG = {"prompt": "a fox", "size": "256x256", "num_inference_steps": 200}


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_that_disconnects_cancels_its_request(make_server, stream):
    server = make_server()
    engine = server.engine
    body = {**LONG, "stream": True, "partial_images": 3} if stream else LONG
    reader, writer = await open_request(server, body, key=None)
    if stream:
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        await reader.readuntil(b"event: image_generation.partial_image")  # after step 50
    else:
        await server.wait_for(lambda: engine.scheduler.num_running == 1)
    assert server.call(lambda: len(engine.executor._worker.states)) == 1
    writer.close()
    await server.wait_for(lambda: engine.num_unfinished == 0 and not engine.scheduler.requests, timeout=10)
    # The worker drops the state with the abort (the free runs on its thread after the task).
    await server.wait_for(lambda: not engine.executor._worker.states, timeout=10)
    assert server.metric("gfdit_requests_total", {"outcome": "aborted"}) == 1
    assert server.metric("gfdit_requests_total", {"outcome": "finished"}) == 0
    assert not server.server.admission.inflight


async def test_a_full_queue_answers_429_with_retry_after_and_recovers(make_server):
    server = make_server(max_queue=1)
    reader, writer = await open_request(server, LONG, key=None)
    await server.wait_for(lambda: server.engine.num_unfinished == 1)
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.RateLimitError) as info:
        await client.images.generate(prompt="a fox", size="64x64")
    assert info.value.status_code == 429 and info.value.response.headers["retry-after"] == "1"
    assert info.value.body["code"] == "queue_full"
    assert server.metric("gfdit_requests_total", {"outcome": "queue_full"}) == 1
    writer.close()
    await server.wait_for(lambda: not server.server.admission.inflight)
    result = await client.images.generate(prompt="a fox", size="64x64", extra_body=FAST)
    assert png(result.data[0].b64_json).size == (64, 64)


async def test_a_failing_request_is_a_500_or_a_stream_error_event_and_the_server_goes_on(make_server):
    server = make_server()
    worker = server.engine.executor._worker
    denoise = worker.adapter.denoise

    def flaky(states):
        if any(s.params.seed == 666 for s in states):
            raise RuntimeError("CUDA out of memory (simulated)")
        return denoise(states)

    worker.adapter.denoise = flaky
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    bad = {"num_inference_steps": 3, "seed": 666}
    with pytest.raises(openai.InternalServerError) as info:
        await client.images.generate(prompt="a fox", size="64x64", extra_body=bad)
    assert info.value.status_code == 500 and info.value.body["code"] == "request_failed"
    assert "out of memory" in info.value.body["message"]
    stream = await client.images.generate(prompt="a fox", size="64x64", stream=True, extra_body=bad)
    with pytest.raises(openai.APIError, match="out of memory"):
        async for _ in stream:
            pass
    assert server.metric("gfdit_requests_total", {"outcome": "failed"}) == 2
    result = await client.images.generate(prompt="a fox", size="64x64", extra_body=FAST)
    assert png(result.data[0].b64_json).size == (64, 64)


async def test_stop_aborts_what_outlives_the_drain_timeout_with_503(make_server):
    server = make_server(drain_timeout_s=0.5)
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    request = asyncio.create_task(client.images.generate(prompt="a fox", size="256x256",
                                                         extra_body={"num_inference_steps": 200}))
    await server.wait_for(lambda: server.engine.scheduler.num_running == 1)
    stopping = server.submit(server.server.stop())
    with pytest.raises(openai.APIStatusError) as info:
        await request
    assert info.value.status_code == 503 and info.value.body["code"] == "shutting_down"
    await stopping
    assert server.metric("gfdit_requests_total", {"outcome": "aborted"}) == 1
    await server.wait_for(lambda: server.engine.num_unfinished == 0 and not server.engine.executor._worker.states)


async def test_health_fails_when_the_engine_stalls_or_stops(make_server):
    server = make_server(stall_timeout_s=0.3)
    worker = server.engine.executor._worker
    gate = threading.Event()
    denoise = worker.adapter.denoise

    def stuck(states):  # a hung device: the step never returns until released
        gate.wait(30)
        return denoise(states)

    worker.adapter.denoise = stuck
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    request = asyncio.create_task(client.images.generate(prompt="a fox", size="64x64", extra_body=FAST))
    try:
        await server.wait_for(lambda: server.engine.scheduler.num_running == 1)
        await asyncio.sleep(0.5)
        status, body = await asyncio.to_thread(get_json, server.url + "/health")
        assert status == 503 and body["error"]["code"] == "engine_stalled"
    finally:
        gate.set()
    assert png((await request).data[0].b64_json).size == (64, 64)
    assert (await asyncio.to_thread(get_json, server.url + "/health"))[0] == 200
    server.call(lambda: asyncio.ensure_future(server.engine.shutdown()))
    await server.wait_for(lambda: not server.engine.is_running)
    status, body = await asyncio.to_thread(get_json, server.url + "/health")
    assert status == 503 and body["error"]["code"] == "engine_unavailable"


def get_json(url: str) -> tuple[int, dict]:
    return post_json(url, None)


def post_json(url: str, body: dict | None) -> tuple[int, dict]:
    """GET (no body) or POST JSON without any key; the status and the decoded answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)
