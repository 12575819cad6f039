"""A worker's world against a stand-in torch.distributed: NCCL is aborted, not destroyed,
when a new epoch replaces a world (a peer may be gone), and its operations get the
collectives' timeout; a clean shutdown destroys it."""

from types import SimpleNamespace as NS

import pytest

from engine.config import ModelConfig
from engine.executor.protocol import WorkerSpec
from engine.executor.world import COLLECTIVE_TIMEOUT_S, World


class FakeDist:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.initialized = False
        self.distributed_c10d = NS(_abort_process_group=self._abort)

    def TCPStore(self, *args, **kwargs):  # noqa: N802 - torch's name
        return object()

    def PrefixStore(self, prefix, store):  # noqa: N802
        return (prefix, store)

    def init_process_group(self, backend, **kwargs):
        self.initialized = True
        self.calls.append(("init", backend, kwargs["timeout"].total_seconds(), kwargs["store"][0]))

    def is_initialized(self):
        return self.initialized

    def barrier(self):
        self.calls.append(("barrier",))

    def destroy_process_group(self):
        self.initialized = False
        self.calls.append(("destroy",))

    def _abort(self):
        self.initialized = False
        self.calls.append(("abort",))


class FakeComm:
    closed = 0

    def close(self):
        FakeComm.closed += 1


def spec(device: str) -> WorkerSpec:
    return WorkerSpec(rank=0, world_size=2, epoch=0, model=ModelConfig(), device=device, threads=1,
                      store_host="127.0.0.1", store_port=1, join_timeout_s=60.0, cmd_fds=(-1, -1, -1),
                      out_fds=(-1, -1, -1), ring_capacity=1, parent_fd=-1, parent_pid=1)


@pytest.mark.parametrize(("device", "leaves_by", "timeout_s"), [
    ("cuda:0", "abort", COLLECTIVE_TIMEOUT_S),  # NCCL: its watchdog enforces the collectives' timeout
    ("cpu", "destroy", 60.0),  # gloo carries only the join's barrier; its destroy cannot hang on a peer
])
def test_a_new_epoch_aborts_nccl_and_a_shutdown_destroys_it(device, leaves_by, timeout_s):
    dist = FakeDist()
    world = World(spec(device), dist=dist, collectives=lambda *args: FakeComm())
    world.join(0, 2)
    world.join(1, 2)
    world.leave()
    assert dist.calls == [("init", "nccl" if device != "cpu" else "gloo", timeout_s, "gfdit/world/0"), ("barrier",),
                          (leaves_by,),
                          ("init", "nccl" if device != "cpu" else "gloo", timeout_s, "gfdit/world/1"), ("barrier",),
                          ("destroy",)]
