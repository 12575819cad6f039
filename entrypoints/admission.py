"""Which generation requests the server lets into the engine: a bound, and draining.

The bound counts requests admitted and not yet answered (waiting or running in the
engine). Past it the server answers 429 at once instead of queueing without limit, so
an overload shows up as fast refusals with ``Retry-After`` rather than as ever longer
latencies. Draining (after SIGTERM) refuses everything new with 503 and lets the server
wait for the requests it already holds.
"""

from __future__ import annotations

import asyncio

from entrypoints.protocol import APIError

RETRY_AFTER_S = 1


class Admission:
    def __init__(self, max_requests: int) -> None:
        if max_requests < 1:
            raise ValueError("max_requests must be >= 1")
        self.max_requests = max_requests
        self.inflight: set[str] = set()
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def check_open(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down and takes no new requests",
                           type="server_error", code="shutting_down")

    def admit(self, request_id: str) -> None:
        """Take a request in, or raise the 503 / 429 that refuses it."""
        self.check_open()
        if len(self.inflight) >= self.max_requests:
            raise APIError(429, f"the server already holds its limit of {self.max_requests} requests; "
                                "retry later", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        self.inflight.add(request_id)
        self._idle.clear()

    def release(self, request_id: str) -> None:
        self.inflight.discard(request_id)
        if not self.inflight:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until every admitted request was answered; False if the timeout came first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False
