"""Batch lines name LoRA adapters like the HTTP body does."""

from __future__ import annotations

from engine.params import Limits, LoraRef
from entrypoints.batch_input import parse_line
from tests.scheduling_helpers import MODEL


def test_batch_lines_carry_loras():
    job = parse_line('{"prompt": "a fox", "loras": [{"name": "ink", "scale": 0.5}]}', 1)
    assert job.error is None
    resolved = job.params.resolve(MODEL, Limits())
    assert resolved.loras == (LoraRef(name="ink", scale=0.5),)
