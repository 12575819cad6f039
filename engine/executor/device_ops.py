"""What a worker asks of its device around a task: wait for its work, read its memory.

CUDA kernels run asynchronously: a task's Python code returns once its kernels are
queued, long before the GPU has run them (FlowMatch keeps its sigmas on the device, so
no step reads a value back). A task's time therefore counts only after
``synchronize()``; without it the profiles, the cost model's inputs, the deadline
policies' decisions, the stage metrics and progress would all measure kernel launches.

``CudaOps`` is the real device; ``HostOps`` the CPU, where work is done when the call
returns and there is no allocator to read. Tests give a Worker their own ``DeviceOps``
(a device whose work completes late) instead of patching torch.
"""

from __future__ import annotations

from typing import Protocol

import torch


class DeviceOps(Protocol):
    def synchronize(self) -> None:
        """Return once every kernel queued so far on the device has finished."""

    def reset_peak(self) -> None: ...

    def allocated(self) -> int:
        """Bytes held by live tensors."""

    def peak(self) -> int:
        """Most bytes held by live tensors since ``reset_peak``."""

    def reserved(self) -> int:
        """Bytes the caching allocator holds (live tensors included)."""


class HostOps:
    """The CPU: work is done when the call returns; no device memory to report."""

    def synchronize(self) -> None:
        return None

    def reset_peak(self) -> None:
        return None

    def allocated(self) -> int:
        return 0

    def peak(self) -> int:
        return 0

    def reserved(self) -> int:
        return 0


class CudaOps:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def reserved(self) -> int:
        return torch.cuda.memory_reserved(self.device)


def device_ops(device: torch.device) -> DeviceOps:
    return CudaOps(device) if device.type == "cuda" else HostOps()


# Substrings of the CUDA runtime errors after which the context is unusable: every later
# kernel launch in the process fails the same way (out-of-memory is not among them).
_STICKY_CUDA_ERRORS = (
    "device-side assert",
    "illegal memory access",
    "illegal instruction",
    "misaligned address",
    "unspecified launch failure",
    "uncorrectable ecc",
    "cublas_status_execution_failed",
    "launch timed out",
    "hardware stack error",
)


def is_sticky_cuda_error(exc: BaseException) -> bool:
    """Whether ``exc`` leaves this process's CUDA context unusable (it must exit and be
    replaced); an out-of-memory error does not."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    text = str(exc).lower()
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return "out of memory" not in text
    return "cuda error" in text and any(s in text for s in _STICKY_CUDA_ERRORS)
