"""A request's worker-side state as bytes, to move it between workers (no pickle).

The layout is ``[u32 header length][msgspec header][tensor bytes ...]``. The request's
step cache (its stored residuals and counters) travels like the latents. The header
describes every value: tensors by dtype, shape and offset into the payload; Python
scalars inline; lists and dicts of those recursively. The request's diffusers scheduler
travels as its instance attributes (step index, past model outputs of multistep
solvers, sigmas ...) applied onto a fresh scheduler of the same config, and its
generator as its state, so a moved request continues exactly where it stopped.

Between GPUs (``pack_parts`` with the device) the tensors already on that device stay
out of the bytes: the header lists them (``direct``: dtype and shape, in order) and they
cross NCCL as they are, with no copy through the host; the rest (the generator's state,
host-side scheduler values) stays inline, so the header remains small.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec
import torch

from engine.models.base import DiTAdapter, RequestState
from engine.params import ImageParams

_DTYPES = {str(dt).removeprefix("torch."): dt for dt in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}
# Scheduler attributes rebuilt by the receiver's fresh instance rather than sent.
_SCHEDULER_SKIP = {"_internal_dict"}


class _Packer:
    def __init__(self, direct_device: torch.device | None = None) -> None:
        self.direct_device = direct_device
        self.chunks: list[bytes] = []
        self.offset = 0
        self.direct: list[torch.Tensor] = []

    def encode(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if self.direct_device is not None and value.device == self.direct_device:
                self.direct.append(value.detach().contiguous())
                return {"x": len(self.direct) - 1, "d": str(value.device)}
            data = value.detach().to("cpu").contiguous()
            raw = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
            ref = {"t": str(data.dtype).removeprefix("torch."), "s": list(data.shape), "o": self.offset,
                   "d": str(value.device)}
            self.chunks.append(raw)
            self.offset += len(raw)
            return ref
        if isinstance(value, (list, tuple)):
            return {"l": [self.encode(v) for v in value], "tuple": isinstance(value, tuple)}
        if isinstance(value, dict):
            return {"m": {str(k): self.encode(v) for k, v in value.items()}}
        if value is None or isinstance(value, (bool, int, float, str)):
            return {"v": value}
        raise TypeError(f"cannot move a value of type {type(value).__name__}")


def _decode(ref: dict, payload: memoryview, device: torch.device, direct: list[torch.Tensor]) -> Any:
    if "x" in ref:
        return direct[ref["x"]]
    if "t" in ref:
        dtype = _DTYPES[ref["t"]]
        count = 1
        for dim in ref["s"]:
            count *= dim
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        raw = bytearray(payload[ref["o"]:ref["o"] + nbytes])
        flat = torch.frombuffer(raw, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
        tensor = flat.view(dtype).reshape(ref["s"])
        return tensor.to(device if ref["d"] != "cpu" else "cpu")
    if "l" in ref:
        items = [_decode(r, payload, device, direct) for r in ref["l"]]
        return tuple(items) if ref["tuple"] else items
    if "m" in ref:
        return {k: _decode(r, payload, device, direct) for k, r in ref["m"].items()}
    return ref["v"]


def pack_state(state: RequestState) -> bytes:
    """The whole state as bytes (the shared-memory path)."""
    return pack_parts(state)[0]


def pack_parts(state: RequestState, direct_device: torch.device | None = None) -> tuple[bytes, list[torch.Tensor]]:
    """The state's header and inline bytes, and its tensors on ``direct_device`` (none when
    None), which travel on their own, in the header's ``direct`` order."""
    packer = _Packer(direct_device)
    scheduler = {k: v for k, v in vars(state.scheduler).items() if k not in _SCHEDULER_SKIP}
    header = {
        "request_id": state.request_id,
        "params": msgspec.to_builtins(state.params),
        "step": state.step,
        "latents": packer.encode(state.latents),
        "cond": packer.encode(state.cond),
        "uncond": packer.encode(state.uncond),
        "timesteps": packer.encode(state.timesteps),
        "extra": packer.encode(state.extra),
        "cache": packer.encode(state.cache),
        "generator": packer.encode(state.generator.get_state()),
        "scheduler": packer.encode(scheduler),
        "direct": [[str(t.dtype).removeprefix("torch."), list(t.shape)] for t in packer.direct],
    }
    encoded = msgspec.msgpack.encode(header)
    return b"".join([struct.pack("<I", len(encoded)), encoded, *packer.chunks]), packer.direct


def direct_specs(data: bytes) -> list[tuple[list[int], torch.dtype]]:
    """Shapes and dtypes of the tensors that travel beside the bytes ``data``, in order."""
    header, _ = _header(data)
    return [(shape, _DTYPES[dtype]) for dtype, shape in header["direct"]]


def _header(data: bytes) -> tuple[dict, memoryview]:
    (length,) = struct.unpack_from("<I", data)
    return msgspec.msgpack.decode(data[4:4 + length]), memoryview(data)[4 + length:]


def unpack_state(data: bytes, adapter: DiTAdapter, direct: list[torch.Tensor] | None = None) -> RequestState:
    header, payload = _header(data)
    device = adapter.device
    tensors = direct or []
    if len(tensors) != len(header["direct"]):
        raise ValueError(f"state {header['request_id']} needs {len(header['direct'])} tensors, got {len(tensors)}")

    def get(key: str) -> Any:
        return _decode(header[key], payload, device, tensors)

    params = msgspec.convert(header["params"], ImageParams)
    generator = torch.Generator(device="cpu")
    generator.set_state(get("generator"))
    scheduler = adapter.new_scheduler()
    vars(scheduler).update(get("scheduler"))
    state = RequestState(header["request_id"], params, get("latents"), get("cond"), get("uncond"), scheduler,
                         get("timesteps"), generator, step=header["step"], extra=get("extra"),
                         cache=get("cache"))
    state.step_kwargs = adapter._step_kwargs(state)
    return state
