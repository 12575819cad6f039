"""How much memory a task will need: learned from the peaks the workers measure.

A worker reports, per task, the bytes allocated when the task began and the peak during
it (torch.cuda.max_memory_allocated; 0 on CPU, where nothing is learned). Their
difference is the task's activation memory. Per stage it is divided by the task's units
of work, so one figure per stage covers every batch size, image size and degree:

    DENOISE  image tokens x rows / degree    (rows = images, x2 with CFG; Ulysses splits
                                              the sequence over the group's ranks)
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
from engine.request import ShapeKey


def image_tokens(shape: ShapeKey, size_multiple: int = 16) -> int:
    """Transformer tokens of one image: ``size_multiple`` pixels per token side (VAE factor
    x patch size)."""
    return max(1, (shape.width // size_multiple) * (shape.height // size_multiple))


class MemoryModel:
    def __init__(self, size_multiple: int = 16, window: int = 64, margin: float = 1.1) -> None:
        self.size_multiple = size_multiple
        self.margin = margin
        # stage -> recent (tokens, bytes per unit) samples.
        self._samples: dict[Stage, deque[tuple[int, float]]] = {s: deque(maxlen=window) for s in Stage}

    def tokens(self, shape: ShapeKey) -> int:
        return image_tokens(shape, self.size_multiple)

    def units(self, stage: Stage, shape: ShapeKey, images: int, degree: int = 1) -> float:
        rows = images * (2 if shape.cfg else 1)
        if stage == Stage.ENCODE:
            return float(rows)
        if stage == Stage.DECODE:
            return float(self.tokens(shape) * images)
        return self.tokens(shape) * rows / max(degree, 1)

    def learn(self, stage: Stage, shape: ShapeKey, images: int, degree: int, activation_bytes: int) -> None:
        units = self.units(stage, shape, images, degree)
        if activation_bytes > 0 and units > 0:
            tokens = 1 if stage == Stage.ENCODE else self.tokens(shape)
            self._samples[stage].append((tokens, activation_bytes / units))

    def known(self, stage: Stage) -> bool:
        return bool(self._samples[stage])

    def bytes_per_unit(self, stage: Stage, shape: ShapeKey) -> float | None:
        samples = self._samples[stage]
        if not samples:
            return None
        tokens = 1 if stage == Stage.ENCODE else self.tokens(shape)
        return self.margin * max(per_unit * max(1.0, tokens / seen) for seen, per_unit in samples)

    def activation_bytes(self, stage: Stage, shape: ShapeKey, images: int, degree: int = 1) -> int | None:
        """Predicted activation bytes per rank of a task; None while the stage is unknown."""
        per_unit = self.bytes_per_unit(stage, shape)
        return None if per_unit is None else math.ceil(per_unit * self.units(stage, shape, images, degree))

    def max_images(self, stage: Stage, shape: ShapeKey, degree: int, headroom: int) -> int | None:
        """Most images of ``shape`` whose task fits in ``headroom`` bytes; None if unknown."""
        per_unit = self.bytes_per_unit(stage, shape)
        if per_unit is None:
            return None
        per_image = per_unit * self.units(stage, shape, 1, degree)
        return int(max(headroom, 0) // per_image) if per_image > 0 else None
