"""Fixtures of the model tests: real-width pipelines for the CUDA tests, built once."""

from __future__ import annotations

import pytest
import torch

from tests.cuda_helpers import SCALED_LAYERS


@pytest.fixture(scope="session")
def scaled_folders(tmp_path_factory):
    """family -> a saved bf16 diffusers folder of its real-width pipeline (drawn on the GPU)."""
    from benchmarks.scaled_models import scaled_pipeline

    folders: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in folders:
            layers, single = SCALED_LAYERS[family]
            pipe = scaled_pipeline(family, layers, single, device="cuda", dtype=torch.bfloat16)
            folder = tmp_path_factory.mktemp(f"scaled-{family}")
            pipe.save_pretrained(folder)
            folders[family] = str(folder)
            del pipe
            torch.cuda.empty_cache()
        return folders[family]

    return get
