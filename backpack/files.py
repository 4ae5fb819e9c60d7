"""Crash-safe file writes: a hidden temporary name beside the target, fsync, one rename over it.

A reader (or a rerun after a crash) finds either the old complete file or the new complete file under the final
name, never half of one. The trainer's checkpoints, the benchmark's result files and the toolkit's figures all
write through here.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (new, renamed or removed names) to the disk."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def atomic_file(
    path: str | os.PathLike, mode: str = "wb", on_written: Callable[[str], None] | None = None
) -> Iterator[IO]:
    """Open a hidden temporary file beside `path`; when the block ends without an error, flush and fsync it, rename
    it over `path` and fsync the folder. On an error the temporary file is removed and `path` is untouched.

    Args:
        path: The final name; its folder must exist.
        mode: ``"wb"`` or ``"w"`` (UTF-8 text).
        on_written: Called with the temporary path once the data is on disk, before the rename (the trainer's
            fault injection stops a process exactly there).
    """
    folder, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
    # O_EXCL: never follow or reuse a name someone else put there; 0o666 leaves the permissions to the umask.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if on_written is not None:
            on_written(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    fsync_dir(folder)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text` (UTF-8), atomically; its folder is created if missing."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_file(path, "w") as handle:
        handle.write(text)


def write_json_atomically(path: str | os.PathLike, value: object, indent: int = 2) -> None:
    """Replace `path` with `value` as indented JSON, atomically; NaN and inf become null, so any reader accepts it."""
    write_text_atomically(path, json.dumps(_finite(value), indent=indent) + "\n")


def _finite(value: object) -> object:
    """`value` with NaN/inf floats replaced by None (strict JSON)."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
