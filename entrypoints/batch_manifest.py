"""The batch manifest (``DIR/manifest.jsonl``) and the image files its rows point at.

Crash safety rests on one ordering: each image goes to a temporary file, is flushed to
disk and renamed into place *before* its row is appended and flushed. So a row means its
files are whole; a file without a row (a run killed between the two) is made again and
replaced; a row cut short by a crash is ignored (and the next row starts on a new line);
leftover temporary files are removed when a run starts. The last row of an id wins.

Row ``status``: ``ok`` (images written), ``bad_input`` (the line is unusable; skipped on
re-runs until the line changes, or, when it broke the model's or the engine's bounds, the
model or the limits change: ``engine_key``), ``failed`` (the engine could not make it;
tried again on the next run). Only one run may write to a directory at a time (an
advisory lock).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, TextIO

from entrypoints.batch_input import Job

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock
    fcntl = None  # type: ignore[assignment]

MANIFEST_NAME = "manifest.jsonl"
OK, BAD_INPUT, FAILED = "ok", "bad_input", "failed"
_TEMPORARY = re.compile(r"^\..+_\d+\.(png|jpeg|webp)\.tmp$")


class ManifestLockedError(RuntimeError):
    """Another run is writing to the same output directory."""


class Manifest:
    """The append-only record of what exists: one JSON row per finished, bad or failed id."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.path = output_dir / MANIFEST_NAME
        self._file: TextIO = self.path.open("a+", encoding="utf-8", errors="replace")
        if fcntl is not None:
            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._file.close()
                raise ManifestLockedError(f"another gfdit batch is writing to {output_dir}") from None
        self.rows: dict[str, dict[str, Any]] = {}
        self._file.seek(0)
        text = self._file.read()
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # cut short by a crash: its id is simply made again
            if isinstance(row, dict) and isinstance(row.get("id"), str):
                self.rows[row["id"]] = row
        if text and not text.endswith("\n"):
            self._append("")  # so the next row does not extend the cut-off one

    def complete(self, job: Job, engine_key: str) -> bool:
        """Whether this line needs no work: its images exist, or this same line was bad
        (for the same model and limits, when those made it bad)."""
        row = self.rows.get(job.id)
        if row is None or row.get("input_hash") != job.input_hash:
            return False  # new, or the line was edited since
        if row.get("status") == BAD_INPUT:
            return row.get("engine_key") in (None, engine_key)
        files = row.get("files")
        return (row.get("status") == OK and isinstance(files, list) and bool(files)
                and all((self.output_dir / str(name)).is_file() for name in files))

    def write(self, row: dict[str, Any]) -> None:
        self.rows[row["id"]] = row
        self._append(json.dumps(row))

    def _append(self, line: str) -> None:
        self._file.write(line + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()  # also releases the lock


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` so that it is either absent or whole, even across a crash or power loss."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


def remove_temporaries(output_dir: Path) -> int:
    """Delete the temporary files a killed run left behind; returns how many."""
    stale = [p for p in output_dir.iterdir() if _TEMPORARY.match(p.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)
