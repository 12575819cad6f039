"""Looking at processes and /dev/shm from the tests (Linux /proc, no extra dependency)."""

from __future__ import annotations

import os

from engine.distributed.shm_channels import SEGMENT_PREFIX as CHANNELS_PREFIX
from engine.executor.shm_queue import SEGMENT_PREFIX, SHM_DIR


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2:].split()  # fields after "pid (comm)"


def is_alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def worker_children(parent: int | None = None) -> list[int]:
    """Live worker processes whose parent is ``parent`` (this process by default)."""
    parent = os.getpid() if parent is None else parent
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat(int(name))
            if (fields is not None and fields[0] != "Z" and int(fields[1]) == parent
                    and "engine.executor.worker_main" in _cmdline(int(name))):
                found.append(int(name))
    return found


def our_segments(pid: int) -> list[str]:
    """Ring and collective-channel segments that process ``pid`` created and still names."""
    return [n for n in os.listdir(SHM_DIR)
            if n.startswith((f"{SEGMENT_PREFIX}{pid}-", f"{CHANNELS_PREFIX}{pid}-"))]
