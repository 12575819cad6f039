"""Which GPU processes are ours when NVML and gfdit may number processes differently.

NVML names each process on a device by its pid in the host's (initial) PID namespace.
In a container with a PID namespace of its own, gfdit knows its workers by their pids in
that namespace, so compared naively its own workers look foreign: every rank is marked
interfered and derated by our own load. Two remedies, from ``/proc``:

- every pid of one of our processes counts, in every namespace ``/proc`` shows it in
  (the ``NSpid`` line of ``/proc/<pid>/status``: the pid in the namespace of that /proc
  mount, then in each nested one);
- in a PID namespace other than the initial one, a pid NVML reports that names no process
  here may be any process of the host, ours included: it is *unknown*, not foreign. A pid
  that names a process here that is not ours is still foreign (another program in the same
  container using the GPU).

The initial namespace is recognised by ``/proc/self/ns/pid``, whose inode the kernel
fixes (``PROC_PID_INIT_INO``). Where ``/proc`` cannot be read, pids compare as they are.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from functools import cached_property

INITIAL_PID_NAMESPACE = "pid:[4026531836]"


class PidNamespace:
    """Reads a ``/proc`` (another root in tests) to tell our processes from foreign ones."""

    def __init__(self, proc: str = "/proc") -> None:
        self.proc = proc

    @cached_property
    def initial(self) -> bool:
        """Whether this process runs in the initial PID namespace (pids equal NVML's)."""
        try:
            return os.readlink(os.path.join(self.proc, "self", "ns", "pid")) == INITIAL_PID_NAMESPACE
        except OSError:
            return True  # cannot tell: compare pids as they are

    def aliases(self, pid: int) -> set[int]:
        """``pid`` and its numbers in the other namespaces ``/proc`` shows."""
        try:
            with open(os.path.join(self.proc, str(pid), "status")) as status:
                for line in status:
                    if line.startswith("NSpid:"):
                        return {pid, *(int(v) for v in line.split()[1:])}
        except (OSError, ValueError):
            pass
        return {pid}

    def ours(self, pids: Iterable[int]) -> set[int]:
        return {alias for pid in pids for alias in self.aliases(pid)}

    def foreign(self, device_pids: Iterable[int], ours: set[int]) -> list[int]:
        """The pids among ``device_pids`` (as NVML reports them) that are surely not ours."""
        others = sorted(pid for pid in device_pids if pid not in ours)
        if self.initial:
            return others
        return [pid for pid in others if os.path.exists(os.path.join(self.proc, str(pid)))]
