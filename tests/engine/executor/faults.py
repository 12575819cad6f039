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


def fail_once_like_a_gpu(worker) -> None:
    """Faults a GPU run meets, each once (a marker file in $GFDIT_TEST_FAULT_DIR, removed
    when it fires, so the retry in a replacement process succeeds):

    - marker ``cuda-error``: rank 0's next single-rank denoise raises a sticky CUDA error;
    - marker ``multi-rank``: rank 1 raises in its part of the next degree-2 denoise, while
      rank 0 waits in the step's collectives.
    """
    import os

    real_denoise = worker.adapter.denoise
    fault_dir = os.environ["GFDIT_TEST_FAULT_DIR"]

    def fires(name: str) -> bool:
        try:
            os.remove(os.path.join(fault_dir, name))
        except FileNotFoundError:
            return False
        return True

    def denoise(states):
        degree = len(worker.sp.group or ()) or 1
        if worker.rank == 0 and degree == 1 and fires("cuda-error"):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if worker.rank == 1 and degree == 2 and fires("multi-rank"):
            raise RuntimeError("simulated out of memory on one rank of the group")
        return real_denoise(states)

    worker.adapter.denoise = denoise
