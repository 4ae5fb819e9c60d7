"""Crash-safe result files: write to a temporary name in the same folder, fsync, then rename over the target.

A benchmark that is killed by a time box (the device check) leaves either the previous complete file or the new
complete file, never half a JSON document.
"""

from __future__ import annotations

import json
import os
import tempfile


def write_text(path: str, text: str) -> None:
    """Replace `path` with `text` atomically (the folder is created if missing)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def write_json(path: str, data: object) -> None:
    """Replace `path` with `data` as indented JSON, atomically. Non-finite floats are written as null."""
    write_text(path, json.dumps(_finite(data), indent=1) + "\n")


def _finite(value: object) -> object:
    """`value` with NaN/inf floats replaced by None, so that the file is strict JSON that any reader accepts."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
