"""Ulysses attention over 2 real worker processes: degree 2 equals degree 1 equals the pipeline."""

import multiprocessing as mp
import traceback

import pytest
import torch

from engine.distributed.shm_channels import World
from tests.helpers import FAMILY_PRESETS


def _worker(spec, rank, presets, sizes, queue):
    try:
        torch.set_num_threads(1)
        from engine.distributed.group_free import ShmCollectives
        from engine.distributed.ulysses import SequenceParallel, install
        from engine.models.loader import load_adapter

        sp = SequenceParallel(ShmCollectives(spec, rank, timeout_s=60))
        results = {}
        for preset in presets:
            adapter = load_adapter(preset, device="cpu")
            install(adapter.transformer, adapter.family, sp)
            results[preset] = _run_sizes(adapter, sp, rank, sizes)
        queue.put((rank, results))
    except Exception:  # noqa: BLE001
        queue.put((rank, traceback.format_exc()))


def _run_sizes(adapter, sp, rank, sizes):
        from engine.request import ImageParams, Limits

        results = []
        for width, height in sizes:
            params = ImageParams(seed=7, width=width, height=height, num_inference_steps=4, guidance_scale=3.0,
                                 n=2).resolve(adapter.info(), Limits())
            (cond, uncond), = adapter.encode(["a red fox"], [params])
            single = adapter.prepare("a", params, cond, uncond)
            wide = adapter.prepare("b", params, cond, uncond)
            # Alternate the wide state's degree: 2, 1, 2, 1 ...
            for step in range(params.num_inference_steps):
                adapter.denoise([single])
                if step % 2 == 0:
                    with sp.running((0, 1)):
                        adapter.denoise([wide])
                else:
                    adapter.denoise([wide])
            results.append(((width, height), (single.latents - wide.latents).abs().max().item(),
                            wide.latents.numpy().copy(), dict(params=params)))
        return results


@pytest.mark.timeout(600)  # every family in one pair of processes
def test_degree_two_matches_degree_one_and_the_pipeline(preset_pipelines):
    """One pair of processes runs every family, alternating a request between degree 2 and 1."""
    from tests.helpers import pipeline_reference

    ctx = mp.get_context("spawn")
    world = World(2)
    queue = ctx.Queue()
    sizes = [(64, 64), (96, 64)]
    procs = [ctx.Process(target=_worker, args=(world.spec, r, FAMILY_PRESETS, sizes, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=540) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
        world.close()
    for out in results.values():
        assert isinstance(out, dict), out
    for preset in FAMILY_PRESETS:
        for rank in (0, 1):
            for size, diff, _, _ in results[rank][preset]:
                assert diff <= 1e-4, (preset, rank, size, diff)
        for (size, _, latents0, info), (_, _, latents1, _) in zip(results[0][preset], results[1][preset]):
            assert (latents0 == latents1).all()  # every member ends with the same full latents
            ref_latents, _ = pipeline_reference(preset_pipelines(preset), "a red fox", info["params"])
            assert abs(latents0 - ref_latents.numpy()).max() <= 1e-4, (preset, size)
