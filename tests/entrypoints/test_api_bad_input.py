"""Hundreds of generated malformed requests: every answer is a 4xx in OpenAI's error shape,
none is a 5xx, and the server goes on serving."""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
from dataclasses import dataclass, field

import aiohttp
from PIL import Image

from tests.entrypoints.conftest import API_KEY

GENERATIONS = "/v1/images/generations"
GOOD = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}


@dataclass
class Case:
    name: str
    body: bytes | None
    headers: dict[str, str] = field(default_factory=lambda: dict(GOOD))
    method: str = "POST"
    path: str = GENERATIONS
    status: int | None = None  # the exact status expected, where it is certain
    param: str | None = None  # the param the error must name, where there is one

    @property
    def reaches_handler(self) -> bool:
        """Counted by the handler as 'rejected' (past routing and the key check)."""
        return (self.method == "POST" and self.path == GENERATIONS
                and self.headers.get("Authorization") == GOOD["Authorization"])


def js(value: object) -> bytes:
    return json.dumps(value).encode()


# A wrong-typed value for each field: one value of every JSON type the field does not take.
FIELD_TYPES = {
    "prompt": "str", "model": "str", "n": "int", "size": "str", "quality": "str",
    "response_format": "str", "output_format": "str", "output_compression": "int", "background": "str",
    "user": "str", "stream": "bool", "partial_images": "int", "negative_prompt": "str",
    "num_inference_steps": "int", "guidance_scale": "number", "seed": "int",
}
SAMPLES = [("str", "text"), ("str", "5"), ("int", 7), ("float", 2.5), ("float", 3.0), ("bool", True),
           ("list", [1]), ("object", {"a": 1})]
ACCEPTS = {"str": {"str"}, "int": {"int"}, "bool": {"bool"}, "number": {"int", "float"}}

OUT_OF_RANGE = [
    ("n", 0), ("n", 11), ("n", -1), ("n", 10**6), ("size", "7x9"), ("size", "abc"), ("size", "64"),
    ("size", "64x"), ("size", "x64"), ("size", "0x64"), ("size", "64X64"), ("size", "64x64x64"),
    ("size", "-64x64"), ("size", "65x64"), ("size", "64x72"), ("size", "8192x64"), ("size", "64 x 64"),
    ("size", " 64x64"), ("size", ""), ("size", "1e3x64"), ("quality", "ultra"), ("quality", ""),
    ("quality", "HIGH"), ("response_format", "png"), ("output_format", "gif"), ("output_format", "PNG"),
    ("output_format", "raw"), ("output_compression", -1), ("output_compression", 101),
    ("background", "transparent"), ("background", "none"), ("partial_images", -1), ("partial_images", 4),
    ("num_inference_steps", 0), ("num_inference_steps", -5), ("num_inference_steps", 201),
    ("num_inference_steps", 10**9), ("guidance_scale", -0.5), ("guidance_scale", 100.5),
    ("guidance_scale", 1e308), ("seed", -1), ("seed", 2**63), ("seed", 2**80), ("prompt", ""),
    ("prompt", "   "), ("prompt", "x" * 9000), ("negative_prompt", "y" * 9000), ("model", "dall-e-3"),
    ("model", ""),
]

INVALID_JSON = [b"", b"{", b"}", b"nul", b"[1,2", b'{"prompt": }', b'{"prompt": "a"}}', b"NaN",
                b"{'prompt': 'a'}", b'{"prompt": "a",}', b'{"prompt": "a" "n": 1}', b"\xff\xfe\x00",
                b'{"prompt": "\\x"}', b'{"prompt": "a", "n": 01}', b'{"prompt": "a", "n": 1.}',
                b'{"prompt": "a", "n": Infinity}', b'{"prompt": "a"} trailing', b'{"prompt": "unterminated',
                b'\x00' * 16, b"\xef\xbb\xbf" + js({"prompt": "a"})]


def generate_cases() -> list[Case]:
    cases = []
    for name, kind in FIELD_TYPES.items():
        for sample, value in SAMPLES:
            if sample in ACCEPTS[kind]:
                continue
            body = {"prompt": "a fox", name: value}
            cases.append(Case(f"type:{name}={value!r}", js(body), status=400, param=name))
    for name, value in OUT_OF_RANGE:
        status = 404 if name == "model" else 400
        cases.append(Case(f"range:{name}={str(value)[:12]}", js({"prompt": "a fox", name: value}),
                          status=status, param=name))
    cases += [
        Case("combo:stream+url", js({"prompt": "a", "stream": True, "response_format": "url"}), status=400,
             param="response_format"),
        Case("combo:partials>steps", js({"prompt": "a", "stream": True, "partial_images": 3,
                                         "num_inference_steps": 2}), status=400, param="partial_images"),
    ]
    for i, body in enumerate(INVALID_JSON):
        cases.append(Case(f"json:{i}", body, status=400))
    for body in (b"null", b"1", b'"a fox"', b"[]", b'[{"prompt": "a"}]', b"true", b"{}", b'{"n": 2}',
                 b'{"prompt": null}', b'{"size": "64x64"}'):
        cases.append(Case(f"shape:{body[:10]!r}", body, status=400))
    for name in ("foo", "style", "steps", "Prompt", "image", "mask", "width"):
        cases.append(Case(f"unknown:{name}", js({"prompt": "a", name: 1}), status=400, param=name))
    huge = js({"prompt": "a " * (600 * 1024)})
    cases += [Case("huge:prompt", huge, status=413),
              Case("huge:padding", b" " * (1536 * 1024) + js({"prompt": "a"}), status=413),
              Case("huge:field", js({"prompt": "a", "user": "u" * (2 << 20)}), status=413)]
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                         "application/xml", "application/jsonl", "image/png", ""):
        headers = {**GOOD, "Content-Type": content_type}
        cases.append(Case(f"ctype:{content_type or 'none'}", js({"prompt": "a fox"}), headers, status=415))
    for auth in ("", "Bearer wrong", f"Basic {API_KEY}", API_KEY, f"bearer {API_KEY}", f"Bearer  {API_KEY}",
                 f"Bearer {API_KEY}x", "Bearer"):
        headers = {"Content-Type": "application/json", **({"Authorization": auth} if auth else {})}
        cases.append(Case(f"auth:{auth[:14]}", js({"prompt": "a fox"}), headers, status=401))
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        cases.append(Case(f"method:{method}", js({"prompt": "a"}), method=method, status=405))
    for method, path, status in (
            ("POST", "/v1/images/edits", 404), ("POST", "/v1/images/variations", 404),
            ("POST", "/v1/chat/completions", 404), ("POST", "/v2/images/generations", 404),
            ("POST", "/v1/images/generations/x", 404), ("GET", "/images/", 404),
            ("GET", "/images/nosuch.png", 404), ("POST", "/images/nosuch.png", 405), ("POST", "/health", 405)):
        cases.append(Case(f"path:{method} {path}", js({"prompt": "a"}), method=method, path=path, status=status))
    return cases


async def send(session: aiohttp.ClientSession, base: str, case: Case) -> tuple[Case, int, bytes]:
    headers = dict(case.headers)
    skip = [] if "Content-Type" in headers and headers["Content-Type"] else ["Content-Type"]
    headers = {k: v for k, v in headers.items() if v}
    async with session.request(case.method, base + case.path, data=case.body, headers=headers,
                               skip_auto_headers=skip) as reply:
        return case, reply.status, await reply.read()


def check_error_shape(case: Case, status: int, body: bytes) -> str | None:
    """None when the answer is a proper 4xx error, else what is wrong."""
    if not 400 <= status < 500:
        return f"status {status}"
    if case.status is not None and status != case.status:
        return f"status {status}, expected {case.status}"
    try:
        payload = json.loads(body)
    except ValueError:
        return f"not JSON: {body[:80]!r}"
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return f"not OpenAI's error shape: {payload}"
    if not isinstance(error["message"], str) or not error["message"] or not isinstance(error["type"], str):
        return f"empty message or type: {error}"
    if case.param is not None and error["param"] != case.param:
        return f"param {error['param']!r}, expected {case.param!r} ({error['message']})"
    return None


async def test_hundreds_of_malformed_requests_get_4xx_and_the_server_goes_on(server):
    cases = generate_cases()
    assert len(cases) >= 200
    rejected_before = server.metric("gfdit_requests_total", {"outcome": "rejected"})
    limit = asyncio.Semaphore(8)

    async def bounded(session, case):
        async with limit:
            return await send(session, server.url, case)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        answers = await asyncio.gather(*(bounded(session, case) for case in cases))
        problems = {case.name: p for case, status, body in answers if (p := check_error_shape(case, status, body))}
        statuses = sorted({status for _, status, _ in answers})
        assert not problems, problems
        assert all(400 <= s < 500 for s in statuses), statuses
        assert {400, 401, 404, 405, 413, 415} <= set(statuses)

        # The server is still up and serving.
        body = js({"prompt": "a fox", "size": "64x64", "num_inference_steps": 2})
        async with session.post(server.url + GENERATIONS, data=body, headers=GOOD) as reply:
            assert reply.status == 200
            image = Image.open(io.BytesIO(base64.b64decode((await reply.json())["data"][0]["b64_json"])))
            assert image.size == (64, 64)
        async with session.get(server.url + "/health") as reply:
            assert reply.status == 200
    counted = sum(case.reaches_handler for case in cases)
    assert server.metric("gfdit_requests_total", {"outcome": "rejected"}) == rejected_before + counted
    assert server.call(lambda: server.engine.num_unfinished) == 0
    print(f"{len(cases)} malformed requests: statuses {dict(_count(s for _, s, _ in answers))}")


def _count(values):
    return {k: len(list(g)) for k, g in itertools.groupby(sorted(values))}
