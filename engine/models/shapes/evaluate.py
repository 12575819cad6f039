"""Reading a generated picture back with pixel statistics, to score the shapes model.

The background is the border's median colour; the object is every pixel far from it (more
than half as far as the farthest pixels are); its
colour is their median; its shape is how much of its bounding box it fills (a square fills
all of it, a circle pi/4, an upright triangle half). Each reading snaps to the nearest
palette colour or shape, so a prediction is right or wrong, never "close".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from engine.models.shapes.dataset import PALETTE, Scene

_PALETTE_NAMES = list(PALETTE)
_PALETTE_RGB = np.array([PALETTE[n] for n in _PALETTE_NAMES], dtype=np.float32)
OBJECT_DISTANCE = 60.0  # RGB distance from the background beyond which a pixel is the object
MIN_OBJECT_PIXELS = 12
SQUARE_FILL = 0.88  # above: square
CIRCLE_FILL = 0.64  # above: circle, below: triangle


@dataclass(frozen=True)
class Reading:
    background: str
    color: str | None
    shape: str | None
    fill: float


def nearest_color(rgb: np.ndarray) -> str:
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE_RGB - rgb) ** 2).sum(axis=1)))]


def read_image(image: Image.Image) -> Reading:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background_rgb = np.median(border, axis=0)
    background = nearest_color(background_rgb)
    distance = np.sqrt(((pixels - background_rgb) ** 2).sum(axis=2))
    # Far = more than half way to the object's own distance (its 99th percentile), so faint
    # tints and speckle in the background (a generated picture has some) are not the object.
    mask = distance > max(OBJECT_DISTANCE, 0.5 * float(np.percentile(distance, 99)))
    if mask.sum() < MIN_OBJECT_PIXELS:
        return Reading(background, None, None, 0.0)
    color = nearest_color(np.median(pixels[mask], axis=0))
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = float(mask.sum() / box)
    shape = "square" if fill > SQUARE_FILL else "circle" if fill > CIRCLE_FILL else "triangle"
    return Reading(background, color, shape, fill)


@dataclass(frozen=True)
class Scores:
    color_accuracy: float
    background_accuracy: float
    shape_accuracy: float
    count: int

    def as_dict(self) -> dict[str, float]:
        return {"color_accuracy": self.color_accuracy, "background_accuracy": self.background_accuracy,
                "shape_accuracy": self.shape_accuracy, "count": self.count}

    def __str__(self) -> str:
        return (f"colour {self.color_accuracy:.3f}  background {self.background_accuracy:.3f}  "
                f"shape {self.shape_accuracy:.3f}  (n={self.count})")


def score(scenes: list[Scene], images: list[Image.Image]) -> Scores:
    readings = [read_image(img) for img in images]
    n = len(readings)
    return Scores(
        color_accuracy=sum(r.color == s.color for r, s in zip(readings, scenes)) / n,
        background_accuracy=sum(r.background == s.background for r, s in zip(readings, scenes)) / n,
        shape_accuracy=sum(r.shape == s.shape for r, s in zip(readings, scenes)) / n,
        count=n,
    )
