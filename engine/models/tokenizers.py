"""Tokenizers built in memory for the tiny presets.

Model hubs may be unreachable, so the presets cannot download real vocabularies. These
builders make small but real tokenizers (a SentencePiece-style Unigram for T5, a byte-level
BPE for CLIP) that segment any text deterministically and survive
``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import string

from transformers import CLIPTokenizer, T5Tokenizer

# Words common in image prompts get their own pieces so prompts tokenize into a
# handful of ids rather than one id per character.
_PROMPT_WORDS = ["a", "an", "the", "of", "in", "on", "at", "with", "and", "or", "to", "from", "by", "over", "under", "near", "behind", "photo", "painting", "drawing", "portrait", "picture", "image", "red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "gold", "silver", "fox", "cat", "dog", "bird", "horse", "fish", "tree", "forest", "river", "lake", "sea", "ocean", "mountain", "sky", "cloud", "sun", "moon", "star", "night", "day", "city", "street", "house", "castle", "car", "boat", "man", "woman", "child", "robot", "dragon", "flower", "garden", "field", "snow", "rain", "fire", "light", "dark", "big", "small", "old", "new", "beautiful", "detailed", "realistic", "style", "art", "high", "quality", "4k"]


def build_t5_tokenizer(model_max_length: int = 512) -> T5Tokenizer:
    """A Unigram tokenizer with T5's special tokens: pad=0, eos=1, unk=2."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    seen = {p for p, _ in pieces}
    for word in _PROMPT_WORDS:
        piece = "▁" + word
        if piece not in seen:
            pieces.append((piece, -5.0 - 0.01 * len(pieces)))
            seen.add(piece)
    for char in string.ascii_letters + string.digits + string.punctuation:
        for piece, score in ((char, -10.0), ("▁" + char, -10.5)):
            if piece not in seen:
                pieces.append((piece, score))
                seen.add(piece)
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def _byte_alphabet() -> list[str]:
    """CLIP's reversible byte -> printable unicode map (the GPT-2 scheme), in byte order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def build_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A byte-level BPE with CLIP's start/end tokens and merges for the prompt words."""
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for char in alphabet:
        vocab[char] = len(vocab)
    for char in alphabet:
        vocab[char + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    seen_merges: set[tuple[str, str]] = set()
    for word in _PROMPT_WORDS:
        if len(word) < 2 or not word.isalpha():
            continue
        current = word[0]
        for i, char in enumerate(word[1:]):
            nxt = char + ("</w>" if i == len(word) - 2 else "")
            pair = (current, nxt)
            current = current + nxt
            if pair not in seen_merges:
                merges.append(pair)
                seen_merges.add(pair)
            vocab.setdefault(current, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
