"""Images kept for a limited time so that ``response_format="url"`` can return links.

The link's token is the only key (unguessable, like a signed URL), so fetching an image
needs no API key and works from a browser. The store is bounded in time (each image
lives ``ttl_s``) and in memory (the oldest go first past ``max_bytes``); every image
shares one TTL, so insertion order is expiry order and both bounds trim from the front.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    format: str
    expires_at: float

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]


class ImageStore:
    def __init__(self, ttl_s: float, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._images: OrderedDict[str, StoredImage] = OrderedDict()
        self._bytes = 0

    def put(self, data: bytes, fmt: str) -> str:
        """Keep an image; returns its name (``token.ext``), the last part of its URL."""
        if fmt not in CONTENT_TYPES:
            raise ValueError(f"cannot serve images in format {fmt!r}")
        name = f"{secrets.token_urlsafe(24)}.{'jpg' if fmt == 'jpeg' else fmt}"
        self._images[name] = StoredImage(data, fmt, self._clock() + self.ttl_s)
        self._bytes += len(data)
        self._trim()
        return name

    def get(self, name: str) -> StoredImage | None:
        """The image, or None once it expired, was evicted, or never was."""
        self._trim()
        return self._images.get(name)

    def __len__(self) -> int:
        return len(self._images)

    @property
    def num_bytes(self) -> int:
        return self._bytes

    def _trim(self) -> None:
        now = self._clock()
        while self._images:
            name, image = next(iter(self._images.items()))
            if image.expires_at > now and self._bytes <= self.max_bytes:
                break
            del self._images[name]
            self._bytes -= len(image.data)
