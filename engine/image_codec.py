"""Image encoding in the worker (PNG / JPEG / WebP, or raw RGB bytes) and decoding for clients."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from engine.messages import ImageData

# PIL names of the formats the engine accepts.
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
DEFAULT_QUALITY = 90


def encode_image(pixels: np.ndarray, fmt: str, compression: int | None = None) -> ImageData:
    """Encode one (H, W, 3) uint8 image.

    ``compression`` follows the OpenAI API's ``output_compression`` (0-100): for JPEG and
    WebP it is the quality; for PNG it picks the zlib level (0-9), default a fast 1.
    """
    height, width = pixels.shape[:2]
    if fmt == "raw":
        return ImageData(np.ascontiguousarray(pixels).tobytes(), "raw", width, height)
    buffer = io.BytesIO()
    image = Image.fromarray(pixels, "RGB")
    if fmt == "png":
        level = 1 if compression is None else round(compression * 9 / 100)
        image.save(buffer, "PNG", compress_level=level)
    else:
        quality = DEFAULT_QUALITY if compression is None else compression
        image.save(buffer, _PIL_FORMATS[fmt], quality=quality)
    return ImageData(buffer.getvalue(), fmt, width, height)


def decode_image(image: ImageData) -> Image.Image:
    if image.format == "raw":
        return Image.frombytes("RGB", (image.width, image.height), image.data)
    return Image.open(io.BytesIO(image.data))
