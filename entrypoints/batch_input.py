"""The ``gfdit batch`` input format: one JSON object per line, parsed into Jobs.

A line is ``{"prompt": ...}`` plus optional ``id``, ``negative_prompt``, ``size`` ("WxH"
or N), ``steps``, ``guidance``, ``true_cfg_scale``, ``cfg_normalization``, ``cfg_truncation``,
``seed``, ``n``, ``output_format`` (png, jpeg, webp), ``loras``
(``[{"name": ..., "scale": ...}]``, adapters loaded with ``--lora``) and ``cache``
(``{"method": "fbcache", "threshold": ...}``, or ``"none"`` against ``--cache``).
A line that cannot be used becomes a Job with ``error`` set, never an exception: one bad
line must not stop a run of thousands.

Identity matters for resuming. A job's ``id`` (``line-N`` when the line has none) names
its files and its manifest row; its ``input_hash`` (of the parsed object, so key order
and spacing do not count) tells an unchanged line from an edited one. The default seed
is a hash of the id, so running the same file again remakes the same images.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from engine.params import MAX_SEED, ImageParams, StepCache

FIELDS = ("id", "prompt", "negative_prompt", "size", "steps", "guidance", "true_cfg_scale", "cfg_normalization",
          "cfg_truncation", "seed", "n", "output_format", "loras", "cache")
# Files are written as images; the engine's raw RGB bytes would be unreadable on disk.
FILE_FORMATS = ("png", "jpeg", "webp")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SIZE = re.compile(r"(\d+)x(\d+)")


@dataclass
class Job:
    id: str
    prompt: str = ""
    params: ImageParams | None = None
    error: str | None = None  # set when the line itself is unusable
    input_hash: str = ""
    line: int = 0


def default_seed(job_id: str) -> int:
    """The seed of a line that gives none: stable across runs and machines."""
    return int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:8], "big") & MAX_SEED


def parse_line(text: str, line_number: int) -> Job:
    """One input line -> a Job (with ``error`` set, naming the line, when it is unusable)."""
    job = _parse(text, line_number)
    job.line = line_number
    return job


def _parse(text: str, line_number: int) -> Job:
    fallback = f"line-{line_number}"
    where = f"line {line_number}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return Job(fallback, error=f"{where}: invalid JSON: {exc.msg}", input_hash=_hash(text.strip()))
    input_hash = _hash(json.dumps(data, sort_keys=True))
    if not isinstance(data, dict):
        return Job(fallback, error=f"{where}: expected a JSON object", input_hash=input_hash)
    job_id = data.get("id", fallback)
    if not isinstance(job_id, str) or not _ID.match(job_id):
        return Job(fallback, error=f"{where}: id must be 1-128 letters, digits, '.', '_' or '-' "
                                   "(not starting with '.', '_' or '-')", input_hash=input_hash)
    error = _field_error(data)
    if error is not None:
        return Job(job_id, error=f"{where}: {error}", input_hash=input_hash)
    width = height = None
    if data.get("size") is not None:
        width, height = _parse_size(data["size"])
    seed, n = data.get("seed"), data.get("n")
    params = ImageParams(
        negative_prompt=data.get("negative_prompt"), n=1 if n is None else n, width=width, height=height,
        num_inference_steps=data.get("steps"), guidance_scale=data.get("guidance"),
        true_cfg_scale=data.get("true_cfg_scale"), cfg_normalization=data.get("cfg_normalization"),
        cfg_truncation=data.get("cfg_truncation"), loras=tuple(data.get("loras") or ()), cache=_cache(data),
        seed=default_seed(job_id) if seed is None else seed, output_format=data.get("output_format") or "png")
    return Job(job_id, data["prompt"], params, input_hash=input_hash)


def _cache(data: dict[str, Any]) -> StepCache | None:
    """A line's step cache: an object the engine checks, or "none" (off even with --cache)."""
    value = data.get("cache")
    if value == "none":
        return StepCache(method="none")
    return value  # type: ignore[return-value]  # a dict, checked by ImageParams.resolve


def _field_error(data: dict[str, Any]) -> str | None:
    """What is wrong with the fields the engine does not check itself (it checks the numbers)."""
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        return f"unknown field(s): {', '.join(unknown)} (known: {', '.join(FIELDS)})"
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return "prompt must be a non-empty string"
    negative = data.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        return "negative_prompt must be a string"
    if data.get("size") is not None and _parse_size(data["size"]) is None:
        return f"size must be N or 'WxH', got {data['size']!r}"
    fmt = data.get("output_format")
    if fmt is not None and fmt not in FILE_FORMATS:
        return f"output_format must be one of {', '.join(FILE_FORMATS)}, got {fmt!r}"
    return None


def _parse_size(size: Any) -> Any:
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    if isinstance(size, str) and (found := _SIZE.fullmatch(size)):
        return int(found.group(1)), int(found.group(2))
    return None


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_jobs(lines: Iterable[str]) -> Iterator[Job]:
    """Every non-blank line as a Job; a repeated id is an error on the later line."""
    seen: set[str] = set()
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        job = parse_line(text, number)
        if job.error is None and job.id in seen:
            job = Job(f"line-{number}", error=f"line {number}: duplicate id {job.id!r}",
                      input_hash=job.input_hash, line=number)
        seen.add(job.id)
        yield job


def open_input(path: str) -> TextIO:
    return sys.stdin if path == "-" else open(path, encoding="utf-8")  # noqa: SIM115 - closed by the caller
