"""The store behind response_format=url links: bounded in time and in bytes."""

import pytest

from entrypoints.image_store import ImageStore


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_images_expire_after_the_ttl():
    clock = Clock()
    store = ImageStore(ttl_s=10, max_bytes=1 << 20, clock=clock)
    first = store.put(b"one", "png")
    clock.now = 6
    second = store.put(b"two", "jpeg")
    assert first.endswith(".png") and second.endswith(".jpg") and first != second
    assert store.get(first).data == b"one" and store.get(second).content_type == "image/jpeg"
    clock.now = 10.5
    assert store.get(first) is None and store.get(second).data == b"two"
    clock.now = 16.5
    assert store.get(second) is None and len(store) == 0 and store.num_bytes == 0


def test_the_oldest_go_first_past_the_byte_budget():
    store = ImageStore(ttl_s=100, max_bytes=10)
    names = [store.put(bytes(4), "webp") for _ in range(3)]
    assert store.get(names[0]) is None and store.get(names[1]) and store.get(names[2])
    assert store.num_bytes == 8 and store.get("nosuch.png") is None
    with pytest.raises(ValueError):
        store.put(b"x", "gif")
