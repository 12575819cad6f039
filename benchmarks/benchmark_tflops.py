"""The transformer's achieved TFLOP/s in one denoise step: FLOPs counted, time measured.

    python benchmarks/benchmark_tflops.py --model DIR --size 1024 --batch 4 --device cuda --json tflops.json

DIR is a diffusers folder, e.g. the FLUX-width one from benchmarks/scaled_models.py (no
hub is reachable on the GPU machine). ``--batch`` requests at ``--size`` go through the
adapter's own encode / prepare / denoise, in the model's dtype (bf16 on a GPU); hooks on
the transformer time each of its calls (CUDA events on a GPU) over --iters steps after
--warmup.

FLOPs are counted on one real call, not estimated from a formula: the matrix products
(``mm``, ``addmm``, ``bmm``, ...) by ``torch.utils.flop_counter.FlopCounterMode``, and
attention as 4 x batch x heads x query length x key length x head size per
``scaled_dot_product_attention`` call (QK^T and PV, 2 FLOPs per multiply-add), read off
each call's arguments, since the counter knows only some of the fused attention kernels.
Elementwise work (norms, activations, softmax) is not counted, as is usual for MFU. A
bf16 8192^3 matrix product timed the same way gives the device's practical ceiling.

JSON keys (--json PATH): tflops (achieved, median call), transformer_ms (median call),
flops (per call), matmul_flops, attention_flops, rows (transformer batch rows, x2 with
CFG), image_tokens, matmul_ceiling_tflops (bf16 8192^3, 0 on CPU), fraction_of_ceiling,
model, size, batch, device, dtype, iters.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmarks.common import CallTimer, print_table, write_json  # noqa: E402
from engine.models.loader import load_adapter  # noqa: E402
from engine.request import ImageParams  # noqa: E402


class AttentionFlops(TorchFunctionMode):
    """Counts 4*B*H*Lq*Lk*D for every scaled_dot_product_attention call ((B, H, L, D) inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            named = dict(zip(("query", "key"), args)) | kwargs
            query, key = named["query"], named["key"]
            *batch, q_len, head_dim = query.shape
            self.flops += 4 * q_len * key.shape[-2] * head_dim * _prod(batch)
        return func(*args, **kwargs)


def _prod(values: list[int]) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def count_flops(adapter, states) -> tuple[int, int]:
    """(matmul FLOPs, attention FLOPs) of one step's transformer call (the states advance)."""
    attention = AttentionFlops()
    counter = FlopCounterMode(display=False)
    with counter, attention:
        adapter.denoise(states)
    matmul = sum(flops for op, flops in counter.get_flop_counts()["Global"].items()
                 if "scaled_dot_product" not in str(op))
    return int(matmul), attention.flops


def matmul_ceiling_tflops(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / statistics.median(times) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="preset or diffusers folder")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4, help="requests in the batch")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    adapter = load_adapter(args.model, args.device, args.dtype)
    steps = args.warmup + args.iters + 2
    params = [ImageParams(width=args.size, height=args.size, num_inference_steps=steps, seed=i, n=1,
                          guidance_scale=adapter.info().default_guidance, negative_prompt="", output_format="raw")
              for i in range(args.batch)]
    states = adapter.new_states([str(i) for i in range(args.batch)],
                                [f"a castle over the sea, number {i}" for i in range(args.batch)], params)
    rows = sum(s.n for s in states) * (2 if states[0].uncond is not None else 1)

    matmul, attention = count_flops(adapter, states)
    timer = CallTimer(adapter.transformer)
    for _ in range(args.warmup):
        adapter.denoise(states)
    timer.seconds()
    timer.clear()
    wall = time.perf_counter()
    for _ in range(args.iters):
        adapter.denoise(states)
    calls = timer.seconds()
    wall = time.perf_counter() - wall
    call_s = statistics.median(calls)
    flops = matmul + attention
    ceiling = matmul_ceiling_tflops(adapter.device)
    tflops = flops / call_s / 1e12
    info = adapter.info()
    figures = {
        "tflops": tflops, "transformer_ms": call_s * 1e3, "flops": flops, "matmul_flops": matmul,
        "attention_flops": attention, "rows": rows,
        "image_tokens": info.image_tokens(args.size, args.size),
        "matmul_ceiling_tflops": ceiling, "fraction_of_ceiling": tflops / ceiling if ceiling else 0.0,
        "step_wall_ms": wall / args.iters * 1e3, "model": args.model, "size": args.size, "batch": args.batch,
        "device": str(adapter.device), "dtype": info.dtype, "iters": args.iters,
    }
    write_json(args.json, figures)
    print_table(f"transformer TFLOP/s: {args.model}, {args.batch} x {args.size}x{args.size}, {info.dtype}, "
                f"{figures['device']}", [
        ("measure", "value"),
        ("FLOPs per call (matmul + attention)", f"{flops / 1e12:.2f} T ({matmul / 1e12:.2f} + {attention / 1e12:.2f})"),
        ("transformer call, median (ms)", f"{call_s * 1e3:.1f}"),
        ("achieved TFLOP/s", f"{tflops:.1f}"),
        ("bf16 8192^3 matmul TFLOP/s", f"{ceiling:.1f}"),
        ("fraction of that", f"{figures['fraction_of_ceiling']:.2f}"),
    ])


if __name__ == "__main__":
    main()
