"""/v1/loras and per-request adapters over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest

from entrypoints.api_server import ServerConfig
from tests.entrypoints.conftest import API_KEY, ServerThread

FAST = {"num_inference_steps": 3, "size": "64x64"}


@pytest.fixture(scope="module")
def lora_server(lora_pipelines):
    _, root, _ = lora_pipelines("tiny-flux")
    (root / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    server = ServerThread(ServerConfig(port=0, api_key=API_KEY), model="tiny-flux", lora_dir=str(root))
    yield server
    server.close()


def call(server, method: str, path: str, body: dict | None = None, key: str | None = API_KEY):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def generate(server, **body):
    return call(server, "POST", "/v1/images/generations", {"prompt": "a red fox", **FAST, **body})


def test_load_list_use_and_unload(lora_server):
    assert call(lora_server, "POST", "/v1/loras", {"name": "ink", "path": "ink"}, key=None)[0] == 401
    status, entry = call(lora_server, "POST", "/v1/loras", {"name": "ink", "path": "ink"})
    assert status == 200 and entry["name"] == "ink" and entry["rank"] == 4 and entry["modules"] > 0
    status, listing = call(lora_server, "GET", "/v1/loras")
    assert status == 200 and [e["name"] for e in listing["data"]] == ["ink"]
    plain = generate(lora_server, seed=3)
    styled = generate(lora_server, seed=3, loras=[{"name": "ink", "scale": 1.0}])
    assert plain[0] == styled[0] == 200
    assert plain[1]["data"][0]["b64_json"] != styled[1]["data"][0]["b64_json"]
    status, error = generate(lora_server, loras=[{"name": "nope"}])
    assert status == 400 and error["error"]["param"] == "loras" and "nope" in error["error"]["message"]
    assert call(lora_server, "DELETE", "/v1/loras/ink")[0] == 200
    assert call(lora_server, "GET", "/v1/loras")[1]["data"] == []
    assert call(lora_server, "DELETE", "/v1/loras/ink")[0] == 404
    assert generate(lora_server, loras=[{"name": "ink"}])[0] == 400


@pytest.mark.slow
def test_unloading_an_adapter_a_running_request_uses_is_refused(lora_server):
    assert call(lora_server, "POST", "/v1/loras", {"name": "glow", "path": "glow"})[0] == 200
    result = {}
    running = threading.Thread(target=lambda: result.update(
        out=generate(lora_server, num_inference_steps=20, loras=[{"name": "glow", "scale": 0.5}])))
    running.start()
    try:
        lora_server.call(lambda: None)
        for _ in range(600):
            if lora_server.call(lambda: bool(lora_server.engine.loras.entries["glow"].users)):
                break
            threading.Event().wait(0.02)
        status, error = call(lora_server, "DELETE", "/v1/loras/glow")
        assert status == 409 and error["error"]["code"] == "lora_in_use"
    finally:
        running.join(120)
    assert result["out"][0] == 200 and len(result["out"][1]["data"]) == 1
    assert call(lora_server, "DELETE", "/v1/loras/glow")[0] == 200


def test_paths_outside_the_folder_and_corrupt_files_are_refused(lora_server, tmp_path):
    for path in ("../elsewhere", str(tmp_path), "/etc/passwd"):
        status, error = call(lora_server, "POST", "/v1/loras", {"name": "x", "path": path})
        assert status == 403 and error["error"]["param"] == "path", path
    status, error = call(lora_server, "POST", "/v1/loras", {"name": "x", "path": "corrupt.safetensors"})
    assert status == 400 and "not a readable LoRA adapter" in error["error"]["message"]
    assert call(lora_server, "POST", "/v1/loras", {"name": "x"})[0] == 400
    assert call(lora_server, "GET", "/v1/loras")[1]["data"] == []
    assert generate(lora_server)[0] == 200  # still serving


def test_no_lora_admin_leaves_only_the_listing(lora_pipelines):
    _, root, _ = lora_pipelines("tiny-flux")
    server = ServerThread(ServerConfig(port=0, lora_admin=False), model="tiny-flux", lora_dir=str(root),
                          lora=("ink=ink",))
    try:
        assert [e["name"] for e in call(server, "GET", "/v1/loras")[1]["data"]] == ["ink"]
        assert call(server, "POST", "/v1/loras", {"name": "glow", "path": "glow"})[0] == 405
        assert call(server, "DELETE", "/v1/loras/ink")[0] in (404, 405)
        assert generate(server, loras=[{"name": "ink"}])[0] == 200
    finally:
        server.close()
