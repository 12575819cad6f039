"""A model's prompt-token limit, checked where requests are admitted (no torch, no model).

Text encoders read a bounded number of tokens, and pipelines cut what is over it
silently (Qwen-Image keeps 512 tokens of its templated prompt, Z-Image 512). A prompt
that would be cut is refused instead, with the count, before it costs any work. The
count must be the pipeline's own, template included, so the limit carries the model's
tokenizer (its ``tokenizer.json``) and the template around the prompt; the worker that
loaded the model sends it to the engine inside ``ModelInfo``.
"""

from __future__ import annotations

import functools

import msgspec

from engine.params import InvalidParamsError


class PromptLimit(msgspec.Struct, frozen=True, kw_only=True):
    """``len(tokens(prefix + prompt + suffix)) - skip`` must not exceed ``max_tokens``."""

    max_tokens: int
    prefix: str = ""
    suffix: str = ""
    # Template tokens the pipeline drops before the limit applies (Qwen-Image's 34).
    skip: int = 0
    tokenizer_json: str = ""

    def count(self, prompt: str) -> int:
        encoding = _tokenizer(self.tokenizer_json).encode(self.prefix + prompt + self.suffix, add_special_tokens=False)
        return len(encoding.ids) - self.skip

    def check(self, prompt: str, param: str, model: str) -> None:
        tokens = self.count(prompt)
        if tokens > self.max_tokens:
            raise InvalidParamsError(
                f"{param} is {tokens} tokens long (with the model's prompt template); model {model} reads at "
                f"most {self.max_tokens}", param)

    def __repr__(self) -> str:  # the tokenizer is megabytes of JSON
        return f"PromptLimit(max_tokens={self.max_tokens}, skip={self.skip})"


@functools.lru_cache(maxsize=4)
def _tokenizer(tokenizer_json: str):  # noqa: ANN202 - tokenizers is imported here only
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)
