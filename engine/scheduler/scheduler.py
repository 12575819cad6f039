"""The scheduler: requests + free workers -> tasks; task results -> request updates.

It is pure (no I/O, no torch, no clock reads: ``now`` is passed in), so the engine and the
simulator run the same code, and tests drive it with hand-made results. A Policy decides
what to run; the scheduler checks each plan and keeps the book: which requests are in
which task, where each request's state lives, which workers are busy.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from engine.messages import ItemResult, NewRequest, Stage, Task, TaskResult
from engine.request import Request, RequestStatus
from engine.scheduler.admission import admit
from engine.scheduler.device_state import DeviceState
from engine.scheduler.memory import MemoryModel
from engine.scheduler.migration import plan_migration
from engine.scheduler.policy import Plan, Policy, SchedulerView


class UpdateKind(enum.IntEnum):
    PROGRESS = 0
    FINISHED = 1
    FAILED = 2
    ABORTED = 3
    RESTARTED = 4  # its state was lost with a worker; it runs again from the start


@dataclass
class RequestUpdate:
    """Something the engine must tell the request's caller."""

    request: Request
    kind: UpdateKind
    item: ItemResult | None = None


@dataclass
class SchedulerOutput:
    tasks: list[Task] = field(default_factory=list)
    # (rank, request ids) whose state the rank must drop.
    frees: list[tuple[int, list[str]]] = field(default_factory=list)


@dataclass
class _RunningTask:
    task: Task
    waiting_on: set[int]
    leader_result: TaskResult | None = None


class Scheduler:
    def __init__(self, policy: Policy, num_workers: int, max_batch_size: int = 16,
                 steps_per_task: int = 1, max_retries: int = 1, degrees: tuple[int, ...] = (1,),
                 memory: MemoryModel | None = None, max_batch_tokens: int | None = None,
                 starvation_s: float = 60.0, state_transfer: bool = True) -> None:
        if num_workers < 1 or max_batch_size < 1 or steps_per_task < 1:
            raise ValueError("num_workers, max_batch_size and steps_per_task must be >= 1")
        self.policy = policy
        self.num_workers = num_workers
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.steps_per_task = steps_per_task
        self.max_retries = max_retries
        # A new request held back this long for memory stops newer ones overtaking it.
        self.starvation_s = starvation_s
        # False where a request's state cannot leave its worker (the whole-pipeline
        # fallback): plans that would move it are not started.
        self.state_transfer = state_transfer
        # Sequence-parallel degrees the model allows (its heads divide by them).
        self.degrees = tuple(d for d in degrees if d <= num_workers) or (1,)
        policy.validate(num_workers, self.degrees)
        self.requests: dict[str, Request] = {}
        self.dead: set[int] = set()
        self.last_stage: dict[int, Stage] = {}
        self._running: dict[int, _RunningTask] = {}
        self._frees: list[tuple[int, list[str]]] = []
        self._task_ids = itertools.count()
        # What telemetry says of the ranks (device_state.py), set by whoever observes the
        # devices before each schedule(); the default: no telemetry.
        self.devices = DeviceState()
        # Relative speed per rank (1.0 nominal) set directly (the simulator's hook); it
        # overrides the telemetry's figure for that rank.
        self.rank_speed: dict[int, float] = {}
        # Activation memory per unit of work, learned from the workers' measured peaks.
        self.memory = memory or MemoryModel()
        # rank -> (bytes the rank's allocator holds unused, when it said so): reusable
        # without asking the device, so they count as headroom.
        self._cached: dict[int, tuple[int, float]] = {}
        # Requests that memory admission held back from a planned task (a count).
        self.admission_cuts = 0

    # ----- requests in -------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request

    def abort_request(self, request_id: str, now: float) -> RequestUpdate | None:
        """Stop a request; its state is freed now, or when its running task returns."""
        request = self.requests.get(request_id)
        if request is None or request.status.is_finished:
            return None
        if not request.in_flight:
            self._free_state(request)
            del self.requests[request_id]
        return self._end(request, RequestStatus.ABORTED, now)

    # ----- tasks out ---------------------------------------------------------------
    @property
    def busy(self) -> set[int]:
        """Ranks a running task still waits on."""
        return {rank for running in self._running.values() for rank in running.waiting_on}

    @property
    def free_workers(self) -> list[int]:
        return [w for w in range(self.num_workers) if w not in self.busy and w not in self.dead]

    def schedule(self, now: float) -> SchedulerOutput:
        out = SchedulerOutput()
        free = self.free_workers
        if free:
            idle, running = [], []
            for r in self.requests.values():
                if not r.status.is_finished:
                    (running if r.in_flight else idle).append(r)
            idle.sort(key=lambda r: r.arrival_time)
            devices = self.devices
            headroom = self._headroom()
            view = SchedulerView(
                now=now, free_workers=free, num_workers=self.num_workers,
                max_batch_size=self.max_batch_size, steps_per_task=self.steps_per_task,
                requests=idle, resident_images=self._resident_images(), last_stage=dict(self.last_stage),
                degrees=self.degrees, running=running, rank_speed={**devices.rank_speed, **self.rank_speed},
                interfered=devices.interfered, nearly_full=devices.nearly_full_given(headroom), headroom=headroom,
                memory=self.memory, max_batch_tokens=self.max_batch_tokens, starvation_s=self.starvation_s,
                state_transfer=self.state_transfer)
            for plan in self.policy.plan(view):
                if not self.state_transfer and self._moves_state(plan):
                    continue
                admitted = admit(plan, view, self.requests)
                if admitted is not None:
                    out.tasks.append(self._start(admitted, now))
                self.admission_cuts += len(plan.request_ids) - (len(admitted.request_ids) if admitted else 0)
        out.frees, self._frees = self._frees, []
        return out

    def _moves_state(self, plan: Plan) -> bool:
        return plan.stage != Stage.ENCODE and any(
            rid in self.requests and self.requests[rid].location != tuple(plan.group) for rid in plan.request_ids)

    def _headroom(self) -> dict[int, int]:
        """Bytes a task may allocate per rank: the device's free memory, plus what the
        rank's allocator holds unused if the readings are newer than the rank's report
        (older readings may predate that memory, which would count it twice)."""
        devices = self.devices
        out = {}
        for rank, free in devices.free_memory.items():
            cached, reported = self._cached.get(rank, (0, -float("inf")))
            out[rank] = free + (cached if devices.time >= reported else 0)
        return out

    def predict_activation(self, task: Task) -> int | None:
        """Predicted activation bytes per rank of ``task`` (None while unknown)."""
        requests = [self.requests[rid] for rid in task.request_ids if rid in self.requests]
        if not requests:
            return None
        degree = len(task.group) if task.stage == Stage.DENOISE else 1
        return self.memory.activation_bytes(task.stage, requests[0].key, sum(r.n for r in requests), degree)

    def _resident_images(self) -> dict[int, int]:
        load: dict[int, int] = {}
        for r in self.requests.values():
            for rank in r.location or ():
                load[rank] = load.get(rank, 0) + r.n
        return load

    def _start(self, plan: Plan, now: float) -> Task:
        self._check(plan)
        group = tuple(plan.group)
        task = Task(task_id=next(self._task_ids), stage=plan.stage, request_ids=list(plan.request_ids),
                    group=group, num_steps=plan.num_steps)
        available = set(self.free_workers)
        for rid in plan.request_ids:
            request = self.requests[rid]
            request.task_id = task.task_id
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
            if plan.stage == Stage.ENCODE:
                task.new_requests.append(NewRequest(rid, request.prompt, request.params))
                continue
            if request.location != group:
                try:
                    migration, frees = plan_migration(request, group, available)
                except ValueError as exc:
                    raise RuntimeError(f"policy {self.policy.name}: {exc}") from None
                if migration is not None:
                    task.migrations.append(migration)
                self._frees.extend((rank, [rid]) for rank in frees)
                # Every member of the group holds the full state once the task has run.
                request.location = group
        self.last_stage.update(dict.fromkeys(task.members, task.stage))
        self._running[task.task_id] = _RunningTask(task, set(task.members))
        return task

    def _check(self, plan: Plan) -> None:
        """A bad plan is a bug in the policy: refuse it loudly rather than corrupt state."""
        if not plan.request_ids or not plan.group or len(set(plan.group)) != len(plan.group):
            raise RuntimeError(f"policy {self.policy.name} made an empty or repeating plan: {plan}")
        for rank in plan.group:
            if rank in self.busy or rank in self.dead or not 0 <= rank < self.num_workers:
                raise RuntimeError(f"policy {self.policy.name} planned on unavailable rank {rank}")
        shapes = set()
        for rid in plan.request_ids:
            request = self.requests.get(rid)
            if request is None or request.in_flight or request.status.is_finished:
                raise RuntimeError(f"policy {self.policy.name} planned request {rid} that is not idle")
            if request.stage != plan.stage:
                raise RuntimeError(f"policy {self.policy.name} planned {plan.stage.name} for {request}")
            shapes.add(request.key)
        if plan.stage != Stage.ENCODE and len(shapes) > 1:
            raise RuntimeError(f"policy {self.policy.name} batched different shapes: {shapes}")
        if plan.stage == Stage.DENOISE and len(plan.group) not in self.degrees:
            raise RuntimeError(f"policy {self.policy.name} planned degree {len(plan.group)}; "
                               f"the model allows {self.degrees}")

    # ----- results in --------------------------------------------------------------
    def on_result(self, result: TaskResult, now: float) -> list[RequestUpdate]:
        """Account one group member's result; request updates come with the last member's."""
        running = self._running.get(result.task_id)
        if running is None or result.rank not in running.waiting_on:
            return []
        self._learn_memory(running.task, result, now)
        running.waiting_on.discard(result.rank)
        if result.rank == running.task.group[0]:
            running.leader_result = result
        if running.waiting_on:
            return []
        del self._running[result.task_id]
        return self._apply(running.task, running.leader_result, now)

    def _learn_memory(self, task: Task, result: TaskResult, now: float) -> None:
        """Feed the memory model the task's measured activation on this rank (on CPU the
        peak is 0 and nothing is learned). A rank that only sent state, and a decode's
        non-leaders, computed nothing."""
        self._cached[result.rank] = (result.cached_memory_bytes, now)
        if result.error is not None or result.peak_memory_bytes <= 0 or result.rank not in task.group:
            return
        if task.stage == Stage.DECODE and result.rank != task.group[0]:
            return
        requests = [self.requests[rid] for rid in task.request_ids if rid in self.requests]
        if requests:
            degree = len(task.group) if task.stage == Stage.DENOISE else 1
            self.memory.learn(task.stage, requests[0].key, sum(r.n for r in requests), degree,
                              result.peak_memory_bytes - result.start_memory_bytes)

    def _apply(self, task: Task, result: TaskResult | None, now: float) -> list[RequestUpdate]:
        items = {item.request_id: item for item in (result.items if result else [])}
        updates = []
        for rid in task.request_ids:
            request = self.requests.get(rid)
            if request is None:
                continue
            request.task_id = None
            if request.status.is_finished:  # aborted while in flight
                if task.stage == Stage.ENCODE:
                    request.location = task.group
                if task.stage != Stage.DECODE:
                    self._free_state(request)
                del self.requests[rid]
                continue
            item = items.get(rid)
            if result is None or result.error is not None or item is None or item.error is not None:
                message = (item.error if item is not None and item.error else
                           result.error if result is not None and result.error else
                           f"the worker returned no result for request {rid}")
                updates.append(self._fail(request, message, now, free=False))
                continue
            updates.append(self._advance(request, task, item, now))
        return updates

    def _advance(self, request: Request, task: Task, item: ItemResult, now: float) -> RequestUpdate:
        request.cached_steps = max(request.cached_steps, item.cached_steps)
        if task.stage == Stage.DECODE:
            request.location = None
            del self.requests[request.request_id]
            update = self._end(request, RequestStatus.FINISHED, now)
            update.item = item
            return update
        if task.stage == Stage.ENCODE:
            request.location = task.group
            request.status = RequestStatus.RUNNING
        request.step = item.step
        return RequestUpdate(request, UpdateKind.PROGRESS, item)

    # ----- failures ----------------------------------------------------------------
    def on_worker_failed(self, rank: int, message: str, now: float) -> list[RequestUpdate]:
        """A worker died. Requests that lost their state or task start again from scratch
        (their images are seeded, so they come out the same) up to ``max_retries`` times;
        then they fail with ``message``."""
        self.dead.add(rank)
        lost: set[str] = set()
        for task_id, running in list(self._running.items()):
            if rank in running.task.members:
                del self._running[task_id]
                lost.update(running.task.request_ids)
        updates = []
        for request in list(self.requests.values()):
            hit = request.request_id in lost or (request.location is not None and rank in request.location)
            if request.request_id in lost:
                request.task_id = None
            if request.status.is_finished:  # aborted while in flight
                if not request.in_flight:
                    self._free_state(request)
                    del self.requests[request.request_id]
                continue
            if not hit:
                continue
            if request.retries >= self.max_retries:
                updates.append(self._fail(request, message, now, free=True))
                continue
            request.retries += 1
            self._free_state(request)
            request.status = RequestStatus.WAITING
            request.step = 0
            request.cached_steps = 0
            updates.append(RequestUpdate(request, UpdateKind.RESTARTED))
        return updates

    def on_worker_restarted(self, rank: int) -> None:
        self.dead.discard(rank)

    def _fail(self, request: Request, message: str, now: float, *, free: bool) -> RequestUpdate:
        request.error = message
        if free:
            self._free_state(request)
        self.requests.pop(request.request_id, None)
        return self._end(request, RequestStatus.FAILED, now)

    def _free_state(self, request: Request) -> None:
        for rank in request.location or ():
            if rank not in self.dead:
                self._frees.append((rank, [request.request_id]))
        request.location = None

    def _end(self, request: Request, status: RequestStatus, now: float) -> RequestUpdate:
        request.status = status
        request.finished_time = now
        kind = {RequestStatus.FINISHED: UpdateKind.FINISHED, RequestStatus.FAILED: UpdateKind.FAILED,
                RequestStatus.ABORTED: UpdateKind.ABORTED}[status]
        return RequestUpdate(request, kind)

    # ----- state -------------------------------------------------------------------
    @property
    def num_unfinished(self) -> int:
        return sum(1 for r in self.requests.values() if not r.status.is_finished)

    @property
    def num_waiting(self) -> int:
        return sum(1 for r in self.requests.values() if r.status == RequestStatus.WAITING)

    @property
    def num_running(self) -> int:
        return sum(1 for r in self.requests.values() if r.status == RequestStatus.RUNNING)
