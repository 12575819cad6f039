"""Regrouping cost and sequence-parallel step speed on 2 CPU worker processes.

    python benchmarks/benchmark_regroup.py --json regroup.json

Two processes (1 torch thread each, as the engine's CPU workers) set up a gloo world
and the group-free shared-memory channels once, then:

1. Forming a new group and completing its first all_to_all of 1 MiB per rank:
   ``dist.new_group([0, 1])`` + ``all_to_all_single`` on it, versus group-free (the group
   is a tuple of ranks; its all_to_all runs at once). Each trial makes a new group; the
   median of ``--trials`` on rank 0 is reported, in microseconds.
2. One denoising step of one 512x512 request on ``small-pixart`` (guidance on, so 2 rows)
   at degree 1 (rank 0 alone) versus degree 2 (Ulysses over both ranks), alternating, the
   median of ``--steps`` of each.

JSON keys: group_free_us, new_group_us, speedup (new_group_us / group_free_us),
sp1_step_ms, sp2_step_ms, sp2_vs_sp1_step_speedup, trials, steps, model, size.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import print_table, write_json  # noqa: E402


def _regroup(rank: int, comm, trials: int) -> tuple[float, float]:
    """Median time, on this rank, to form a group and finish its first 1 MiB all_to_all.

    The two mechanisms run in separate phases (gloo's threads stay busy for a while after
    its calls, which would slow whatever ran next), each trial after a barrier of its own
    mechanism. Group-free trials alternate the rank order, (0, 1) then (1, 0): each is a
    group never used just before, and it needs no set-up either way.
    """
    import torch
    import torch.distributed as dist

    numel = (1 << 20) // 4  # 1 MiB of float32 per rank
    data = torch.randn(numel)
    out = torch.empty(numel)
    group_free = []
    for trial in range(trials):
        group = (0, 1) if trial % 2 == 0 else (1, 0)
        comm.barrier(group)
        start = time.perf_counter()
        comm.all_to_all(group, list(data.chunk(2)))
        group_free.append(time.perf_counter() - start)
    new_group = []
    for _ in range(trials):
        dist.barrier()
        start = time.perf_counter()
        gloo_group = dist.new_group([0, 1])
        dist.all_to_all_single(out, data, group=gloo_group)
        new_group.append(time.perf_counter() - start)
    return statistics.median(group_free) * 1e6, statistics.median(new_group) * 1e6


def _step_times(rank: int, comm, model: str, size: int, steps: int) -> tuple[float, float]:
    from engine.distributed.ulysses import SequenceParallel, install
    from engine.models.loader import load_adapter
    from engine.params import ImageParams, Limits

    adapter = load_adapter(model, device="cpu")
    sp = SequenceParallel(comm)
    install(adapter.transformer, adapter.family, sp)
    params = ImageParams(seed=1, width=size, height=size, num_inference_steps=10 * steps + 10).resolve(
        adapter.info(), Limits())
    (cond, uncond), = adapter.encode(["a red fox in the snow"], [params])
    state = adapter.prepare("r", params, cond, uncond)
    adapter.denoise([state])  # warm-up
    with sp.running((0, 1)):
        adapter.denoise([state])
    sp1, sp2 = [], []
    for _ in range(steps):
        comm.barrier((0, 1))
        if rank == 0:
            start = time.perf_counter()
            adapter.denoise([state])
            sp1.append(time.perf_counter() - start)
        comm.barrier((0, 1))
        start = time.perf_counter()
        with sp.running((0, 1)):
            adapter.denoise([state])
        sp2.append(time.perf_counter() - start)
    return (statistics.median(sp1) * 1e3 if sp1 else 0.0), statistics.median(sp2) * 1e3


def _worker(rank: int, spec, port: int, args: argparse.Namespace, queue) -> None:
    try:
        import torch
        import torch.distributed as dist

        from engine.distributed.group_free import ShmCollectives
        from engine.executor.allocator import keep_freed_memory

        keep_freed_memory()  # as the engine's workers do
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        comm = ShmCollectives(spec, rank)
        group_free_us, new_group_us = _regroup(rank, comm, args.trials)
        sp1_ms, sp2_ms = _step_times(rank, comm, args.model, args.size, args.steps)
        queue.put((rank, (group_free_us, new_group_us, sp1_ms, sp2_ms)))
        comm.close()
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        queue.put((rank, traceback.format_exc()))


def main() -> None:
    from engine.distributed.shm_channels import World

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--model", default="small-pixart")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    world = World(2)
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world.spec, port, args, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=1800) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=60)
        world.close()
    for value in results.values():
        if isinstance(value, str):
            raise SystemExit(value)
    group_free_us, new_group_us, sp1_ms, sp2_ms = results[0]
    figures = {
        "group_free_us": group_free_us, "new_group_us": new_group_us, "speedup": new_group_us / group_free_us,
        "sp1_step_ms": sp1_ms, "sp2_step_ms": sp2_ms, "sp2_vs_sp1_step_speedup": sp1_ms / sp2_ms,
        "trials": args.trials, "steps": args.steps, "model": args.model, "size": args.size,
    }
    write_json(args.json, figures)
    print_table("regroup: new group + first 1 MiB all_to_all (gloo, 2 ranks), and Ulysses step", [
        ("measure", "value"),
        ("group-free (us)", f"{group_free_us:.0f}"),
        ("dist.new_group + all_to_all (us)", f"{new_group_us:.0f}"),
        ("speedup", f"{figures['speedup']:.1f}x"),
        (f"{args.model} {args.size}px step, degree 1 (ms)", f"{sp1_ms:.0f}"),
        (f"{args.model} {args.size}px step, degree 2 (ms)", f"{sp2_ms:.0f}"),
        ("degree 2 vs 1", f"{figures['sp2_vs_sp1_step_speedup']:.2f}x"),
    ])


if __name__ == "__main__":
    main()
