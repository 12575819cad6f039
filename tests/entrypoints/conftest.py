"""A real API server on 127.0.0.1 (an ephemeral port), its engine on a loop in a thread.

Tests talk to it over HTTP like any client (the openai SDK, aiohttp, raw sockets) and
read the engine's state through ``server.call`` so they never race its loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from engine.async_engine import AsyncEngine
from entrypoints.api_server import APIServer, ServerConfig
from entrypoints.offline import _LoopThread

T = TypeVar("T")
API_KEY = "sk-test"


class ServerThread:
    def __init__(self, config: ServerConfig, **engine_options: Any) -> None:
        self._runner = _LoopThread()
        options = {"model": "tiny-pixart", "device": "cpu", "executor": "inprocess", **engine_options}
        self.engine = self._runner.run(AsyncEngine.create(**options))
        self.server = APIServer(self.engine, config)
        self._runner.run(self.server.start())
        self.url = self.server.url

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the server's loop and return its result."""
        return self._runner.run(_call(fn))

    def submit(self, coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """Start ``coro`` on the server's loop; await the result from a test's own loop."""
        return asyncio.wrap_future(self._runner.submit(coro))

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        """Poll the server's state (from a test's own loop) until ``predicate`` holds."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not await self.submit(_call(predicate)):
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("the server never reached the expected state")
            await asyncio.sleep(0.02)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.server.metrics.registry.get_sample_value(name, labels or {}) or 0.0

    def close(self) -> None:
        try:
            self._runner.run(self.server.stop())
            self._runner.run(self.engine.shutdown())
        finally:
            self._runner.stop()


async def _call(fn: Callable[[], T]) -> T:
    return fn()


@pytest.fixture
def make_server() -> Iterator[Callable[..., ServerThread]]:
    servers: list[ServerThread] = []

    def make(**options: Any) -> ServerThread:
        engine_options = {k: options.pop(k) for k in list(options) if k in ("model", "max_batch_size")}
        server = ServerThread(ServerConfig(port=0, **options), **engine_options)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    """The shared server: tiny-pixart, an API key, a second served name."""
    server = ServerThread(ServerConfig(port=0, api_key=API_KEY, served_model_names=("tiny-pixart", "pixart")))
    yield server
    server.close()
