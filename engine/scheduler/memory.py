"""How much memory a task will need: learned from the peaks the workers measure.

A worker reports, per task, the bytes allocated when the task began and the peak during
it (torch.cuda.max_memory_allocated; 0 on CPU, where nothing is learned). Their
difference is the task's activation memory. Per stage it is divided by the task's units
of work, so one figure per stage covers every batch size, image size and degree:

    DENOISE  image tokens x rows / degree    (rows = images, x2 with CFG; Ulysses splits
                                              the sequence over the group's ranks)
    (tokens and rows come from the request's BatchKey, i.e. the model's ModelInfo)
    DECODE   image tokens x images           (the VAE, on the leader only)
    ENCODE   rows                            (text encoders; the new latents are small)

The estimate for a task is robust rather than average: the largest bytes-per-unit of the
recent ``window`` tasks, times ``margin``. Going to more tokens than a sample had, the
sample's figure grows in proportion (attention may be quadratic in the sequence), so an
image larger than any seen is predicted on the safe side; going to fewer, it is kept.
Until a stage has a sample, nothing is known about it: the scheduler then runs one
request per task there (admission.py), whose peak teaches the model.
"""

from __future__ import annotations

import math
from collections import deque

from engine.messages import Stage
from engine.model_info import BatchKey


class MemoryModel:
    def __init__(self, window: int = 64, margin: float = 1.1) -> None:
        self.margin = margin
        # stage -> recent (tokens, bytes per unit) samples.
        self._samples: dict[Stage, deque[tuple[int, float]]] = {s: deque(maxlen=window) for s in Stage}

    def units(self, stage: Stage, key: BatchKey, images: int, degree: int = 1) -> float:
        if stage == Stage.ENCODE:
            return float(images * key.rows_per_image)
        if stage == Stage.DECODE:
            return float(key.tokens * images)
        return key.token_rows * images / max(degree, 1)

    def learn(self, stage: Stage, key: BatchKey, images: int, degree: int, activation_bytes: int) -> None:
        units = self.units(stage, key, images, degree)
        if activation_bytes > 0 and units > 0:
            tokens = 1 if stage == Stage.ENCODE else key.tokens
            self._samples[stage].append((tokens, activation_bytes / units))

    def known(self, stage: Stage) -> bool:
        return bool(self._samples[stage])

    def bytes_per_unit(self, stage: Stage, key: BatchKey) -> float | None:
        samples = self._samples[stage]
        if not samples:
            return None
        tokens = 1 if stage == Stage.ENCODE else key.tokens
        return self.margin * max(per_unit * max(1.0, tokens / seen) for seen, per_unit in samples)

    def activation_bytes(self, stage: Stage, key: BatchKey, images: int, degree: int = 1) -> int | None:
        """Predicted activation bytes per rank of a task; None while the stage is unknown."""
        per_unit = self.bytes_per_unit(stage, key)
        return None if per_unit is None else math.ceil(per_unit * self.units(stage, key, images, degree))

    def max_images(self, stage: Stage, key: BatchKey, degree: int, headroom: int) -> int | None:
        """Most images of batch ``key`` whose task fits in ``headroom`` bytes; None if unknown."""
        per_unit = self.bytes_per_unit(stage, key)
        if per_unit is None:
            return None
        per_image = per_unit * self.units(stage, key, 1, degree)
        return int(max(headroom, 0) // per_image) if per_image > 0 else None
