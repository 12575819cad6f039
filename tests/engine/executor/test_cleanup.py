"""Nothing outlives the engine: not after a failed start, a crash of the engine, or Ctrl-C."""

import os
import signal
import subprocess
import sys
import time

import pytest

from engine import AsyncEngine, EngineConfig, EngineDeadError, ImageParams, RequestFailedError
from engine.executor import multiproc
from engine.executor.worker_handle import WorkerStartError
from tests.engine.executor.procs import is_alive, our_segments, worker_children

pytestmark = pytest.mark.timeout(240)

ENGINE_SCRIPT = """
from engine import ImageParams
from entrypoints import DiT

with DiT(model="tiny-pixart", device="cpu", num_workers=1) as dit:
    print("PIDS", *dit.engine.executor.worker_pids().values(), flush=True)
    dit.generate(["a fox"] * 4, ImageParams(num_inference_steps=200, width=64, height=64), use_tqdm=False)
"""


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_workers_and_segments_go_when_the_engine_process_dies_or_is_interrupted(how):
    # A session of its own, so SIGINT reaches the whole process group as Ctrl-C in a terminal does.
    proc = subprocess.Popen([sys.executable, "-c", ENGINE_SCRIPT], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("PIDS"), line
        pids = [int(p) for p in line.split()[1:]]
        assert len(pids) == 1 and is_alive(pids[0])
        time.sleep(1.0)  # generating now
        if how == "SIGKILL":
            proc.kill()
        else:
            os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
        assert wait_until(lambda: not any(is_alive(p) for p in pids), 20), "a worker outlived the engine"
        assert our_segments(proc.pid) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_a_model_that_does_not_load_fails_start_clearly_and_leaves_nothing(tmp_path):
    # A folder that passes the front end's check (it has a model_index.json) but that no
    # worker can load.
    (tmp_path / "model_index.json").write_text('{"_class_name": "PixArtSigmaPipeline"}')
    engine = AsyncEngine(EngineConfig.create(model=str(tmp_path), device="cpu", num_workers=2))
    with pytest.raises(WorkerStartError, match=f"could not load model '{tmp_path}'"):
        await engine.start()
    assert worker_children() == []
    assert our_segments(os.getpid()) == []


@pytest.mark.slow
async def test_a_worker_that_cannot_be_replaced_fails_every_request(monkeypatch, tmp_path):
    marker = tmp_path / "fail"
    monkeypatch.setenv("GFDIT_TEST_FAIL_START_IF", str(marker))
    monkeypatch.setattr(multiproc, "MAX_START_ATTEMPTS", 1)
    engine = await AsyncEngine.create(model="tiny-pixart", device="cpu", num_workers=1)
    executor = engine.executor
    executor._worker_hook = "tests.engine.executor.faults:fail_to_start_if_marked"
    try:
        marker.touch()
        pid = executor.worker_pids()[0]
        params = ImageParams(num_inference_steps=200, width=64, height=64)
        with pytest.raises(RequestFailedError, match="could not be restarted"):
            async for out in engine.generate("a fox", params):
                if out.step == 2:
                    os.kill(pid, signal.SIGKILL)
        assert not executor.healthy
        with pytest.raises(EngineDeadError):
            async for _ in engine.generate("a fox", params):
                pass
    finally:
        await engine.shutdown()
    assert worker_children() == [] and our_segments(os.getpid()) == []
