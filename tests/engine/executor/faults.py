"""Fault injection for the worker-process tests, installed through the executor's worker_hook."""

SEED_THAT_FAILS = 666


def fail_seed_666(worker) -> None:
    """Make every denoise batch holding a request with seed 666 raise, as an out-of-memory would."""
    real_denoise = worker.adapter.denoise

    def denoise(states):
        if any(s.params.seed == SEED_THAT_FAILS for s in states):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_denoise(states)

    worker.adapter.denoise = denoise


def fail_to_start_if_marked(worker) -> None:
    """Fail the model load while the file named by GFDIT_TEST_FAIL_START_IF exists."""
    import os

    marker = os.environ.get("GFDIT_TEST_FAIL_START_IF")
    if marker and os.path.exists(marker):
        raise RuntimeError("simulated start failure")
