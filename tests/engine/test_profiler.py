"""The profiler against a fake executor whose tasks take known times on a fake clock (no torch)."""

import subprocess
import sys

import pytest

from engine.config import EngineConfig
from engine.executor.base import Executor
from engine.messages import ItemResult, ModelInfo, Stage, Task, TaskResult
from engine.model_info import LatentSpec
from engine.profiler import Profiler, ProfileSpec, parse_sizes
from engine.scheduler.cost_model import CostModel


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def true_ms(task: Task, tokens: int) -> float:
    b, d = len(task.request_ids), len(task.group)
    if task.stage == Stage.ENCODE:
        return 5 + 2 * b
    if task.stage == Stage.DECODE:
        return 1 + 0.001 * b * tokens
    ms = (10 + 0.01 * b * tokens) / d + (3 if d > 1 else 0)
    return ms + sum(0.5 + 1e-4 * tokens for _ in task.migrations)


class FakeExecutor(Executor):
    """Answers every member at once; the task's time passes on the fake clock."""

    def __init__(self, workers: int, clock: Clock, heads: int = 4) -> None:
        super().__init__(EngineConfig())
        self.workers, self.clock, self.heads = workers, clock, heads
        self.tasks: list[Task] = []
        self.tokens: dict[str, int] = {}

    @property
    def num_workers(self) -> int:
        return self.workers

    async def start(self, on_result, on_failure, on_restart) -> ModelInfo:
        import asyncio

        self.loop, self.on_result = asyncio.get_running_loop(), on_result
        return ModelInfo(name="fake", family="pixart", default_width=256, default_height=256, default_steps=12,
                         default_guidance=4.5, latent=LatentSpec(channels=4, spatial_compression=8, patch_size=2),
                         max_size=2048, num_heads=self.heads,
                         guidance="cfg", device="cpu", dtype="float32")

    def submit(self, task: Task) -> None:
        self.tasks.append(task)
        for new in task.new_requests:
            self.tokens[new.request_id] = (new.params.width // 16) * (new.params.height // 16)
        self.clock.t += true_ms(task, self.tokens[task.request_ids[0]]) / 1e3
        items = [ItemResult(rid, 0) for rid in task.request_ids]
        for rank in task.members:
            self.loop.call_soon(self.on_result, TaskResult(task.task_id, rank, items if rank == task.group[0] else []))

    def free(self, rank, request_ids) -> None:
        pass

    async def lora_command(self, name, path):
        return []

    async def shutdown(self) -> None:
        pass


async def measure(workers: int, spec: ProfileSpec):
    clock = Clock()
    executor = FakeExecutor(workers, clock)
    profiler = Profiler(executor, clock=clock)
    await profiler.start()
    profile = await profiler.measure(spec, "fake", "test device", source="test")
    return profile, executor


async def test_a_measured_profile_predicts_the_executor():
    spec = ProfileSpec(sizes=((256, 256), (512, 512), (768, 768)), batch_sizes=(1, 2, 4), cycles=1, steps=2)
    profile, executor = await measure(2, spec)
    assert {(p.stage, p.degree) for p in profile.points} == {("encode", 1), ("decode", 1), ("denoise", 1),
                                                            ("denoise", 2)}
    assert profile.size_multiple == 16 and profile.default_steps == 12 and profile.device == "test device"
    cm = CostModel(profile)
    for stage, tokens, batch, degree in [(Stage.DENOISE, 1600, 3, 1), (Stage.DENOISE, 2000, 2, 2),
                                         (Stage.ENCODE, 1024, 3, 1), (Stage.DECODE, 900, 2, 1)]:
        task = Task(0, stage, ["x"] * batch, tuple(range(degree)))
        assert cm.stage_s(stage, tokens, batch, degree) * 1e3 == pytest.approx(true_ms(task, tokens), rel=1e-6)
    assert profile.migration.measured
    assert cm.migration_s(1024) * 1e3 == pytest.approx(0.5 + 1e-4 * 1024, rel=1e-6)
    in_place = [t for t in executor.tasks if t.stage == Stage.DENOISE and not t.migrations]
    moved = [t for t in executor.tasks if t.migrations]
    # Per degree, size and batch: one warm-up step and cycles x steps timed; then per size, one of each.
    assert len(in_place) == 2 * 3 * 3 * (1 + 1 * 2) + 3 and len(moved) == 3


async def test_one_worker_measures_degree_one_and_no_migration():
    profile, _ = await measure(1, ProfileSpec(sizes=((256, 256),), batch_sizes=(1,), cycles=1, steps=1))
    assert {p.degree for p in profile.points} == {1} and not profile.migration.measured
    assert profile.migration.cost_ms(1024, 1) == 0


def test_sizes_parse():
    assert parse_sizes("256,512x768") == ((256, 256), (512, 768))


def test_gfdit_profile_help_lists_its_options():
    out = subprocess.run([sys.executable, "-m", "entrypoints.cli", "profile", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--batch-sizes" in out.stdout and "--worker-threads" in out.stdout


@pytest.mark.slow
def test_gfdit_profile_measures_a_real_model(tmp_path):
    target = tmp_path / "tiny.json"
    out = subprocess.run([sys.executable, "-m", "entrypoints.cli", "profile", "tiny-pixart", "--sizes", "64,128",
                          "--batch-sizes", "1,2", "--cycles", "1", "--steps", "1", "-o", str(target)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    cm = CostModel.load(target)
    assert cm.degrees == (1,) and cm.step_s(cm.tokens(128, 128)) > 0
