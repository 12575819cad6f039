"""The simulator and the engine build their schedulers through one factory: same caps, same plans."""

from __future__ import annotations

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.executor.base import Executor
from engine.messages import ItemResult, ModelInfo, Stage, Task, TaskResult
from engine.model_info import LatentSpec
from engine.params import ImageParams, Limits
from engine.request import Request
from engine.scheduler.cost_model import CostModel
from engine.scheduler.policies import make_policy
from engine.scheduler.scheduler import Scheduler
from engine.sim.simulator import Simulator

INFO = ModelInfo(name="small-pixart", family="pixart", default_width=256, default_height=256, default_steps=4,
                 default_guidance=4.5, latent=LatentSpec(channels=4, spatial_compression=8, patch_size=2),
                 max_size=1024, num_heads=8, guidance="cfg", device="cpu", dtype="float32")


class IdleExecutor(Executor):
    """Starts at once and keeps the tasks it gets: the test answers them by hand."""

    def __init__(self, workers: int) -> None:
        super().__init__(EngineConfig())
        self.workers = workers

    @property
    def num_workers(self) -> int:
        return self.workers

    async def start(self, on_result, on_failure, on_restart) -> ModelInfo:
        return INFO

    def submit(self, task: Task) -> None:
        pass

    def free(self, rank, request_ids) -> None:
        pass

    async def lora_command(self, name, path):
        return []

    async def shutdown(self) -> None:
        pass


QUEUE = [  # (width, height, guidance, steps, n): CFG and not, sizes whose batches the token cap splits
    (256, 256, 4.5, 3, 1), (256, 256, 4.5, 2, 2), (512, 512, 4.5, 2, 1), (256, 256, 1.0, 3, 1),
    (512, 512, 4.5, 3, 1), (256, 256, 4.5, 2, 1), (256, 256, 1.0, 2, 3), (512, 512, 1.0, 2, 1),
]


def requests() -> list[Request]:
    out = []
    for i, (width, height, guidance, steps, n) in enumerate(QUEUE):
        params = ImageParams(width=width, height=height, guidance_scale=guidance, num_inference_steps=steps, n=n,
                             seed=i).resolve(INFO, Limits())
        out.append(Request(str(i), "a prompt", params, INFO.batch_key(params, str(i)), arrival_time=i * 0.01))
    return out


def answer(sched: Scheduler, task: Task, now: float) -> None:
    items = []
    for rid in task.request_ids:
        r = sched.requests[rid]
        step = 0 if task.stage == Stage.ENCODE else min(r.num_steps, r.step + task.num_steps)
        items.append(ItemResult(rid, step))
    for rank in task.members:
        sched.on_result(TaskResult(task.task_id, rank, items if rank == task.group[0] else []), now)


def plans(sched: Scheduler) -> list[list[tuple]]:
    """Every round's tasks until the queue is done, each task answered before the next round."""
    for r in requests():
        sched.add_request(r)
    rounds, now = [], 1.0
    while sched.num_unfinished and len(rounds) < 200:
        tasks = sched.schedule(now).tasks
        rounds.append([(t.stage, tuple(t.request_ids), t.group, t.num_steps) for t in tasks])
        for task in tasks:
            answer(sched, task, now)
        now += 1.0
    assert not sched.num_unfinished
    return rounds


async def engine_scheduler(workers: int, **options) -> Scheduler:
    engine = AsyncEngine(EngineConfig.create(**options), executor=IdleExecutor(workers))
    await engine.start()
    try:
        return engine.scheduler
    finally:
        await engine.shutdown()


async def test_the_simulator_and_the_engine_schedule_the_same_plan_for_the_same_queue():
    for policy, workers in (("fcfs", 1), ("fcfs", 2), ("srtf", 2)):
        engine = await engine_scheduler(workers, policy=policy, max_batch_size=4)
        cm = CostModel.load("cpu_small_pixart")
        sim = Simulator(make_policy(policy), cm, workers, max_batch_size=4, model=INFO, degrees=(1, 2)).scheduler
        # The CPU caps come from the factory on both sides, not from either caller.
        assert (engine.max_batch_size, engine.max_batch_tokens, engine.degrees) == (4, 2048, (1, 2)[:workers])
        assert (sim.max_batch_size, sim.max_batch_tokens, sim.degrees) == (4, 2048, (1, 2)[:workers])
        engine_plans, sim_plans = plans(engine), plans(sim)
        assert engine_plans == sim_plans
        denoise_batches = [len(t[1]) for r in engine_plans for t in r if t[0] == Stage.DENOISE]
        assert max(denoise_batches) > 1  # requests did share steps ...
        for r in engine_plans:  # ... and no batch broke the 2048 token-row cap
            for stage, ids, group, _ in r:
                if stage == Stage.DENOISE and len(ids) > 1:
                    rows = sum(QUEUE[int(i)][4] * (2 if QUEUE[int(i)][2] > 1 else 1)
                               * (QUEUE[int(i)][0] // 16) ** 2 for i in ids)
                    assert rows <= 2048 * len(group)


def test_gfdit_simulate_gets_the_engines_batch_caps_for_the_profiles_device():
    cpu, gpu = CostModel.load("cpu_small_pixart"), CostModel.load("h20_qwen_image")
    assert Simulator(make_policy("fcfs"), cpu, 1).scheduler.max_batch_tokens == 2048
    assert Simulator(make_policy("fcfs"), gpu, 4).scheduler.max_batch_tokens is None
    assert Simulator(make_policy("fcfs"), gpu, 4, max_batch_tokens=4096).scheduler.max_batch_tokens == 4096
    assert Simulator(make_policy("fcfs"), gpu, 4).scheduler.degrees == (1, 2, 4)
