"""One pipeline call stepped through its callback, with a stand-in for a diffusers pipeline."""

from __future__ import annotations

import numpy as np
import pytest

from engine.models.fallback import PipelineRun
from engine.params import ImageParams


class CountingPipe:
    """Calls its step callback ``calls`` times, optionally raising at step ``fail_at``."""

    def __init__(self, calls: int, fail_at: int | None = None) -> None:
        self.calls, self.fail_at = calls, fail_at
        self.unwound = False

    def __call__(self, prompt, callback_on_step_end, **kwargs):
        try:
            for step in range(self.calls):
                if step == self.fail_at:
                    raise RuntimeError("boom")
                callback_on_step_end(self, step, 0, {"latents": np.full((1, 1), step)})
        except BaseException:
            self.unwound = True
            raise
        return type("Out", (), {"images": np.zeros((1, 2, 2, 3))})()


def run_of(pipe, steps: int) -> PipelineRun:
    return PipelineRun("r", ImageParams(num_inference_steps=steps, seed=0, width=64, height=64), "p", {}, pipe)


def test_a_call_advances_one_callback_at_a_time_then_finishes():
    run = run_of(CountingPipe(3), 3)
    assert run.advance() and int(run.latents[0, 0]) == 0
    assert run.advance() and int(run.latents[0, 0]) == 1
    assert run.finish().shape == (1, 2, 2, 3) and run.finished


def test_a_call_that_raises_reports_its_error_instead_of_hanging():
    run = run_of(CountingPipe(5, fail_at=2), 5)
    run.advance()
    run.advance()
    with pytest.raises(RuntimeError, match="boom"):
        run.advance()
    assert run.finished


def test_a_cancelled_call_unwinds_and_a_call_never_started_needs_nothing():
    pipe = CountingPipe(10)
    run = run_of(pipe, 10)
    run.advance()
    thread = run._thread
    run.cancel()
    thread.join(5)
    assert not thread.is_alive() and pipe.unwound and run.images is None
    run_of(CountingPipe(1), 1).cancel()  # no thread: nothing to do
