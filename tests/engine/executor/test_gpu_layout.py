"""Start-up refuses worker layouts NCCL cannot connect: two ranks on one GPU, MIG instances.

torch.cuda is stood in for by its two public queries (this machine has no GPU): nothing
is spawned, the refusal comes before any worker starts.
"""

import pytest
import torch

from engine.config import EngineConfig
from engine.executor.multiproc import MultiprocExecutor, gpu_layout_error
from engine.executor.worker_handle import DeviceLayoutError
from entrypoints.cli import main


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.mark.parametrize(("device", "workers"), [("cuda", 3), ("auto", 4), ("cuda:1", 2)])
def test_two_ranks_on_one_gpu_are_refused_before_any_worker_starts(two_gpus, device, workers):
    with pytest.raises(DeviceLayoutError, match="NCCL needs one GPU per worker"):
        MultiprocExecutor(EngineConfig.create(device=device, num_workers=workers))


def test_one_worker_per_gpu_and_a_single_worker_anywhere_are_fine(two_gpus):
    assert MultiprocExecutor(EngineConfig.create(device="cuda")).num_workers == 2
    assert MultiprocExecutor(EngineConfig.create(device="cuda:1", num_workers=1)).num_workers == 1


def test_several_workers_on_mig_instances_are_refused():
    assert "MIG" in gpu_layout_error(["cuda:0", "cuda:1"], "MIG-aaaa,MIG-bbbb")
    assert gpu_layout_error(["cuda:0"], "MIG-aaaa") is None
    assert gpu_layout_error(["cuda:0", "cuda:1"], "0,1") is None
    assert gpu_layout_error(["cpu", "cpu"], None) is None  # CPU workers share the host freely


def test_the_command_line_says_so_in_one_line(two_gpus, capsys):
    assert main(["generate", "a fox", "--device", "cuda", "--num-workers", "3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gfdit: error: 3 workers on 2 GPU(s) (cuda:0 would hold several)")
