"""Shared fixtures."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from engine.models.presets import build_preset  # noqa: E402


@pytest.fixture(scope="session")
def preset_pipelines():
    """Plain preset pipelines, built once per session (each build gives the same weights)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            pipe = build_preset(name)
            pipe.set_progress_bar_config(disable=True)
            cache[name] = pipe
        return cache[name]

    return get
