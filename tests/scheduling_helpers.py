"""Hand-made requests, views and results for the scheduler and policy tests (no torch)."""

from __future__ import annotations

from engine.messages import ItemResult, Stage, TaskResult
from engine.model_info import BatchKey, LatentSpec, ModelInfo
from engine.params import ImageParams
from engine.request import Request, RequestStatus
from engine.scheduler.cost_model import CostModel
from engine.scheduler.policy import SchedulerView
from engine.scheduler.profile import MigrationSpec, Point, Profile

# A model of 16 pixels per token side (VAE factor 8, patch 2) with standard CFG.
MODEL = ModelInfo(name="test-model", family="pixart", default_width=512, default_height=512, default_steps=20,
                  default_guidance=4.5, latent=LatentSpec(channels=4, spatial_compression=8, patch_size=2),
                  max_size=4096, num_heads=8, guidance="cfg", device="cpu", dtype="float32")


def shape_key(width: int, height: int, cfg: bool = True) -> BatchKey:
    """The test model's batch key of a width x height request, with or without CFG."""
    return MODEL.batch_key(ImageParams(width=width, height=height, guidance_scale=4.5 if cfg else 1.0))


def pixel_size(key: BatchKey) -> tuple[int, int]:
    """(width, height) of the test model's key."""
    _, _, height, width = key.latent_shape
    factor = MODEL.latent.spatial_compression
    return width * factor, height * factor


S, M, L = shape_key(512, 512), shape_key(1024, 1024), shape_key(1536, 1536)


def make_request(rid: str, arrival: float = 0.0, steps: int = 4, n: int = 1, shape: BatchKey = S,
                 priority: int = 0, deadline_s: float | None = None, location: tuple[int, ...] | None = None,
                 step: int = 0) -> Request:
    """A request; with ``location`` it is already encoded there and has done ``step`` steps."""
    width, height = pixel_size(shape)
    params = ImageParams(n=n, width=width, height=height, num_inference_steps=steps,
                         guidance_scale=4.5, seed=0, priority=priority, deadline_s=deadline_s)
    request = Request(rid, "a prompt", params, shape, arrival)
    if location is not None:
        request.location = location
        request.status = RequestStatus.RUNNING
        request.step = step
    return request


def view(requests: list[Request], free: list[int], num_workers: int = 4, now: float = 0.0,
         degrees: tuple[int, ...] = (1, 2, 4), max_batch_size: int = 16, running: list[Request] | None = None,
         rank_speed: dict[int, float] | None = None) -> SchedulerView:
    return SchedulerView(now=now, free_workers=free, num_workers=num_workers, max_batch_size=max_batch_size,
                         steps_per_task=1, requests=sorted(requests, key=lambda r: r.arrival_time),
                         degrees=degrees, running=running or [], rank_speed=rank_speed or {})


def h20() -> CostModel:
    return CostModel.load("h20_qwen_image")


def batching_model(fixed_ms: float = 100.0, per_token_ms: float = 0.1, migration_ms: float = 0.0) -> CostModel:
    """A device where a step has a large fixed cost (so batching pays) and degree 2 halves
    the work: 100 + 0.1*B*t ms at degree 1, 120 + 0.05*B*t at degree 2."""
    points = []
    for size in (512, 1024):
        for batch in (1, 4):
            tokens = (size // 16) ** 2
            points.append(Point("denoise", size, size, batch, 1, fixed_ms + per_token_ms * batch * tokens))
            points.append(Point("denoise", size, size, batch, 2, fixed_ms + 20 + per_token_ms / 2 * batch * tokens))
    return CostModel(Profile("batchy", 16, 20, tuple(points), migration=MigrationSpec(latency_ms=migration_ms)))


def complete(sched, task, now: float = 1.0) -> list:
    """What workers answer: every member reports, the leader with the items."""
    items = []
    for rid in task.request_ids:
        req = sched.requests[rid]
        step = 0 if task.stage == Stage.ENCODE else min(req.num_steps, req.step + task.num_steps)
        items.append(ItemResult(rid, step))
    updates = []
    for rank in task.members:
        updates += sched.on_result(TaskResult(task.task_id, rank, items if rank == task.group[0] else []), now)
    return updates
