import pytest
import torch

from engine.models.attention import AttentionBackendError, resolve_attention_backend


def test_auto_falls_back_to_sdpa_without_cuda():
    assert resolve_attention_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_attention_backend("sdpa", torch.device("cpu")) == "sdpa"


def test_asking_for_xformers_on_cpu_says_why_it_cannot_run():
    with pytest.raises(AttentionBackendError, match="need a CUDA device"):
        resolve_attention_backend("xformers", torch.device("cpu"))
    with pytest.raises(AttentionBackendError, match="unknown attention backend"):
        resolve_attention_backend("flash9", torch.device("cpu"))
