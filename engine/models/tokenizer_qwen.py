"""A Qwen-style byte-level BPE tokenizer built in memory, for the Qwen-Image and Z-Image presets.

Both families template the prompt before encoding it: Qwen-Image wraps it in a system
prompt whose prefix the pipeline drops by position (``prompt_template_encode_start_idx``,
34 tokens), Z-Image renders a chat template (Qwen3's, with ``enable_thinking``). A
tokenizer whose prefix split differently would drop the wrong tokens, so every word of
the template gets its own token, as in the real vocabulary: the Qwen-Image T2I prefix
tokenizes to exactly the 34 tokens the pipeline drops.
"""

from __future__ import annotations

import json
import re

from tokenizers import Regex, Tokenizer, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from engine.models.tokenizers import _PROMPT_WORDS, _byte_alphabet

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# The words of Qwen-Image's T2I system prompt and of the chat roles.
_TEMPLATE_TEXT = (
    "system user assistant Describe the image by detailing the color, shape, size, texture, quantity, "
    "text, spatial relationships of the objects and background"
)

# Qwen3's chat template for a plain conversation: what ZImagePipeline renders with
# add_generation_prompt=True (enable_thinking=True leaves the assistant turn open).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)


def _corpus() -> list[str]:
    text = " ".join(_PROMPT_WORDS) + " " + _TEMPLATE_TEXT
    return [text, text.lower(), *re.findall(r"[A-Za-z]+", text)]


def build_qwen_tokenizer(model_max_length: int = 32768) -> Qwen2Tokenizer:
    """Qwen2's byte-level BPE with its special tokens, trained until every template word is one token.

    The merges are learnt (deterministically) from the template and prompt words, both bare
    and after a space (byte-level BPE spells the space ``Ġ``), so ``"the image"`` is two
    tokens; other text falls back to merges of its bytes.
    """
    alphabet = _byte_alphabet()
    bpe = Tokenizer(BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    # No vocabulary bound: training goes on until each corpus word is a single token.
    trainer = BpeTrainer(vocab_size=100_000, min_frequency=1, initial_alphabet=alphabet, show_progress=False)
    bpe.train_from_iterator(_corpus(), trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        model_max_length=model_max_length, additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
