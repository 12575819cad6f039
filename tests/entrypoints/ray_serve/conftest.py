"""One local Ray cluster for the session: 2 replicas of tiny-pixart behind a real API server.

Ray runs without its dashboard or usage stats, started by the test (``address="local"``
never joins a cluster someone else started on this machine). Its processes talk over this
host's own address (Ray maps 127.0.0.1 to it), which Linux carries on the loopback device.
Each replica is one CPU worker process with one torch thread, as in production.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from entrypoints.api_server import APIServer, ServerConfig
from entrypoints.offline import _LoopThread

ENGINE_OPTIONS = {"model": "tiny-pixart", "device": "cpu", "worker_threads": 1}
RAY_INIT = {"num_cpus": 2, "include_dashboard": False, "log_to_driver": False, "configure_logging": False}


class RayCluster:
    def __init__(self) -> None:
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        import psutil

        from entrypoints.ray_serve import RayEngineClient, ReplicaOptions

        self._runner = _LoopThread()
        self.client = self._runner.run(RayEngineClient.create(
            ENGINE_OPTIONS, ReplicaOptions(num_replicas=2, health_check_period_s=2.0), address="local",
            ray_init=RAY_INIT))
        self.server = APIServer(self.client, ServerConfig(port=0))
        self._runner.run(self.server.start())
        self.url = self.server.url
        self._psutil = psutil
        self.closed = False
        self._handle = None

    def run(self, coro: Any) -> Any:
        return self._runner.run(coro)

    def statuses(self, want: int = 2, timeout: float = 60.0) -> dict[str, Any]:
        """Each live replica's ReplicaStatus, by replica id: Serve routes each call to a replica
        of its choice, so call until ``want`` different replicas have answered."""
        seen: dict[str, Any] = {}
        deadline = time.monotonic() + timeout
        while len(seen) < want:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only replicas {sorted(seen)} answered")
            status = self._status_handle().status.remote().result(timeout_s=timeout)
            seen[status.replica_id] = status
        return seen

    def _status_handle(self) -> Any:
        """One handle for every status call: a handle's router learns the replicas from Serve's
        controller before its first call, which a fresh handle per call would pay each time."""
        from ray import serve

        if self._handle is None:
            self._handle = serve.get_app_handle(self.client.app_name)
        return self._handle

    def descendants(self) -> list[Any]:
        return self._psutil.Process().children(recursive=True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._runner.run(self.server.stop())
            self._runner.run(self.client.shutdown())
        finally:
            self._runner.stop()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    pytest.importorskip("ray.serve")
    cluster = RayCluster()
    yield cluster
    cluster.close()
