"""What the engine hands back to callers: progress and final outputs of a request."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from engine.image_codec import decode_image, encode_image
from engine.messages import ImageData
from engine.params import ImageParams


class RequestFailedError(RuntimeError):
    """The request could not be completed; the message says why."""

    def __init__(self, request_id: str, message: str) -> None:
        super().__init__(message)
        self.request_id = request_id


class RequestAbortedError(RuntimeError):
    """The request was aborted (by ``abort()``, or the engine shutting down)."""

    def __init__(self, request_id: str, message: str = "request aborted") -> None:
        super().__init__(message)
        self.request_id = request_id


@dataclass
class GeneratedImage:
    """One image, encoded as the request asked (``format`` png/jpeg/webp, or raw RGB)."""

    data: bytes
    format: str
    width: int
    height: int

    @classmethod
    def from_wire(cls, image: ImageData) -> GeneratedImage:
        return cls(image.data, image.format, image.width, image.height)

    def to_pil(self) -> Image.Image:
        return decode_image(ImageData(self.data, self.format, self.width, self.height))

    def to_numpy(self) -> np.ndarray:
        return np.asarray(self.to_pil().convert("RGB"))

    def encoded(self, fmt: str = "png", compression: int | None = None) -> bytes:
        """The image in ``fmt``; re-encodes only when the stored format differs."""
        if fmt == self.format:
            return self.data
        return encode_image(self.to_numpy(), fmt, compression).data

    def save(self, path: str | Path) -> None:
        path = Path(path)
        fmt = {".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(path.suffix.lower(), "png")
        path.write_bytes(self.encoded(fmt))


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    finished_time: float | None = None

    @property
    def queue_time(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def latency(self) -> float | None:
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time


@dataclass
class RequestOutput:
    """A progress report (``finished`` False) or the final result of one request."""

    request_id: str
    prompt: str
    params: ImageParams
    step: int
    num_steps: int
    finished: bool = False
    images: list[GeneratedImage] = field(default_factory=list)
    # Previews of the current latents, when the request asked for partial images.
    previews: list[GeneratedImage] = field(default_factory=list)
    metrics: RequestMetrics | None = None
    latents: np.ndarray | None = None
    # Which engine replica made it, when the engine runs as several (None in process).
    replica: str | None = None
    # Of the ``step`` steps done, how many reused their step-cache residual (params.cache).
    cached_steps: int = 0

    @property
    def computed_steps(self) -> int:
        """Steps done that ran every transformer block (all of them without a step cache)."""
        return self.step - self.cached_steps

    @property
    def seed(self) -> int:
        return self.params.seed  # type: ignore[return-value]

    @property
    def pil_images(self) -> list[Image.Image]:
        return [image.to_pil() for image in self.images]
