"""``gfdit serve`` as a process: it serves, and SIGTERM drains it and exits cleanly."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import signal
import sys

import aiohttp
from PIL import Image


class Server:
    """A ``gfdit serve`` process; its output is read all along so its pipe never fills."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.url = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while line := (await self.proc.stdout.readline()).decode():
            self.lines.append(line)
            if not self.url.done() and (found := re.search(r"gfdit: serving .* on (http://\S+)", line)):
                self.url.set_result(found.group(1))
        if not self.url.done():
            self.url.set_exception(AssertionError("the server exited:\n" + self.output))

    @property
    def output(self) -> str:
        return "".join(self.lines)

    async def wait(self, timeout: float) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await self._reader
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.wait(30)


async def start_server(*args: str) -> tuple[Server, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "entrypoints.cli", "serve", *args, "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = Server(proc)
    try:
        return server, await asyncio.wait_for(asyncio.shield(server.url), 120)
    except BaseException:
        await server.kill()
        raise


async def post(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, dict]:
    async with session.post(url + "/v1/images/generations", json=body) as reply:
        return reply.status, await reply.json()


async def wait_for_requests(session: aiohttp.ClientSession, url: str, count: int) -> None:
    for _ in range(3000):
        async with session.get(url + "/health") as reply:
            if (await reply.json())["requests"] == count:
                return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the server never held {count} request(s)")


async def test_sigterm_lets_the_request_in_flight_finish_then_exits_0():
    proc, url = await start_server("tiny-pixart", "--served-model-name", "fox-maker", "--device", "cpu",
                                   "--executor", "inprocess", "--drain-timeout", "120")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as session:
            async with session.get(url + "/v1/models") as reply:
                assert [m["id"] for m in (await reply.json())["data"]] == ["fox-maker"]
            request = asyncio.create_task(post(session, url, {"prompt": "a fox", "size": "256x256",
                                                              "num_inference_steps": 50, "model": "fox-maker"}))
            await wait_for_requests(session, url, 1)
            proc.proc.send_signal(signal.SIGTERM)

            # New requests are refused: 503 on a kept-alive connection, or no connection at all.
            refused = None
            while refused is None:
                try:
                    async with session.get(url + "/health") as reply:
                        if reply.status == 503:
                            refused = (await reply.json())["error"]["code"]
                except aiohttp.ClientConnectionError:
                    refused = "connection refused"
                await asyncio.sleep(0.02)
            assert refused in ("shutting_down", "connection refused")
            assert not request.done(), "the request ended before the drain began"

            status, body = await request
            assert status == 200, (body, proc.output[-3000:])
            image = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
            assert image.size == (256, 256)
        assert await proc.wait(60) == 0, proc.output
        assert "draining requests in flight" in proc.output and "drain timeout" not in proc.output
        # The start-up device summary: on this CPU machine, why there is no GPU telemetry.
        assert "devices: no GPU telemetry: the engine runs on cpu" in proc.output
    finally:
        await proc.kill()
