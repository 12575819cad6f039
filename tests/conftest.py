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


@pytest.fixture(scope="session")
def lora_pipelines(tmp_path_factory):
    """preset -> (a pipeline with the test adapters loaded through diffusers, their folder,
    name -> path). Adapter files live in one folder per preset, the engine's lora_dir."""
    from tests.lora_helpers import load_reference_adapters, make_adapters

    cache = {}

    def get(name: str):
        if name not in cache:
            pipe = build_preset(name)
            pipe.set_progress_bar_config(disable=True)
            root = tmp_path_factory.mktemp(f"lora-{name}")
            paths = make_adapters(pipe, root)
            load_reference_adapters(pipe, paths)
            cache[name] = (pipe, root, paths)
        return cache[name]

    return get
