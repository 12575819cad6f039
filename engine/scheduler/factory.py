"""The one way a Scheduler is built from a model's description and the scheduler options.

The engine and the simulator both call ``make_scheduler``, so the batch caps, the memory
model and the degrees a model allows are the same in ``gfdit serve`` and ``gfdit simulate``.
Pure: no torch; whether the model runs on a GPU is read from ``ModelInfo.device``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from engine.config import SchedulerConfig
from engine.model_info import ModelInfo
from engine.scheduler.cost_model import CostModel
from engine.scheduler.memory import MemoryModel
from engine.scheduler.policies import make_policy
from engine.scheduler.policy import Policy
from engine.scheduler.profile import shipped_profile_for
from engine.scheduler.scheduler import Scheduler

logger = logging.getLogger(__name__)

# On a CPU, past about 2048 token rows per batch the matrix products already keep the cores
# busy and a bigger batch only adds cache misses (docs/ARCHITECTURE.md, Scheduler).
CPU_MAX_BATCH_TOKENS = 2048


def on_gpu(info: ModelInfo) -> bool:
    return info.device.startswith("cuda")


def default_max_batch_size(info: ModelInfo) -> int:
    return default_max_batch_size_on(info.device)


def default_max_batch_size_on(device: str) -> int:
    """The same, by the device a model will run on (``cuda...`` or ``cpu``), before it is loaded."""
    return 16 if device.startswith("cuda") else 8


def default_max_batch_tokens(info: ModelInfo) -> int | None:
    """No cap on a GPU, where memory admission bounds the batch."""
    return None if on_gpu(info) else CPU_MAX_BATCH_TOKENS


def load_cost_model(profile: str | None, info: ModelInfo) -> CostModel | None:
    """The profile asked for, else the shipped one measured on this model or serving its
    family, else None."""
    name = profile or shipped_profile_for(info.name, info.family)
    if name is None:
        return None
    cost_model = CostModel.load(name)
    if cost_model.size_multiple != info.size_multiple:
        logger.warning("profile %s was measured with %d pixels per token side, model %s has %d",
                       name, cost_model.size_multiple, info.name, info.size_multiple)
    logger.info("cost model: profile %s (%s on %s)", name, cost_model.profile.model, cost_model.profile.device)
    return cost_model


def make_scheduler(info: ModelInfo, config: SchedulerConfig, num_workers: int, *,
                   policy: Policy | None = None, cost_model: CostModel | None = None,
                   degrees: Sequence[int] | None = None) -> Scheduler:
    """A scheduler for ``info`` on ``num_workers`` workers.

    ``policy``: a ready policy (the simulator's), else ``config.policy`` with ``cost_model``.
    ``degrees``: restrict the model's degrees further (a profile measured only some).
    """
    allowed = info.degrees(num_workers)
    if degrees is not None:
        allowed = tuple(d for d in allowed if d in set(degrees)) or (1,)
    if policy is None:
        options = {"static_degree": config.static_degree} if config.policy == "static" else {}
        policy = make_policy(config.policy, cost_model=cost_model, **options)
    return Scheduler(policy, num_workers,
                     max_batch_size=config.max_batch_size or default_max_batch_size(info),
                     steps_per_task=config.steps_per_task, max_retries=config.max_retries, degrees=allowed,
                     memory=MemoryModel(), state_transfer=info.state_transfer,
                     max_batch_tokens=config.max_batch_tokens or default_max_batch_tokens(info))
