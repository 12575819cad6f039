"""A request's worker-side state as bytes, to move it between workers (no pickle).

The layout is ``[u32 header length][msgspec header][tensor bytes ...]``. The header
describes every value: tensors by dtype, shape and offset into the payload; Python
scalars inline; lists and dicts of those recursively. The request's diffusers scheduler
travels as its instance attributes (step index, past model outputs of multistep
solvers, sigmas ...) applied onto a fresh scheduler of the same config, and its
generator as its state, so a moved request continues exactly where it stopped.
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
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.offset = 0

    def encode(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
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


def _decode(ref: dict, payload: memoryview, device: torch.device) -> Any:
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
        items = [_decode(r, payload, device) for r in ref["l"]]
        return tuple(items) if ref["tuple"] else items
    if "m" in ref:
        return {k: _decode(r, payload, device) for k, r in ref["m"].items()}
    return ref["v"]


def pack_state(state: RequestState) -> bytes:
    packer = _Packer()
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
        "generator": packer.encode(state.generator.get_state()),
        "scheduler": packer.encode(scheduler),
    }
    encoded = msgspec.msgpack.encode(header)
    return b"".join([struct.pack("<I", len(encoded)), encoded, *packer.chunks])


def unpack_state(data: bytes, adapter: DiTAdapter) -> RequestState:
    (length,) = struct.unpack_from("<I", data)
    header = msgspec.msgpack.decode(data[4:4 + length])
    payload = memoryview(data)[4 + length:]
    device = adapter.device

    def get(key: str) -> Any:
        return _decode(header[key], payload, device)

    params = msgspec.convert(header["params"], ImageParams)
    generator = torch.Generator(device="cpu")
    generator.set_state(get("generator"))
    scheduler = adapter.new_scheduler()
    vars(scheduler).update(get("scheduler"))
    state = RequestState(header["request_id"], params, get("latents"), get("cond"), get("uncond"), scheduler,
                         get("timesteps"), generator, step=header["step"], extra=get("extra"))
    state.step_kwargs = adapter._step_kwargs(state)
    return state
