"""Crash-safe files: a hidden temporary name beside the target, fsync, one rename into place.

A reader (or a rerun after a crash) finds either the old complete file or folder or the new complete one under the
final name, never half of one. Everything is first written under a hidden temporary name in the same folder (so
that the rename stays on one file system and is atomic), flushed to the disk with ``fsync`` and renamed; the parent
folder is then fsynced too, so that the rename itself survives a power cut. Deletions go the other way: rename out
of sight first, then remove. Failures keep the operating system's own reason (``No space left on device:
<path>``), also when a library's writer hides it.

The trainer's checkpoints and exports, the benchmark's result files and the toolkit's figures all write through
here. It is also the one place where the crash tests stop a write: :func:`set_fault_hook` installs a function
(``backpack_train.faults``, from ``BACKPACK_FAULT``) that every write, rename into place, folder creation and
removal of this module calls; without one (every normal run) nothing is observed.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO

PROBE_BYTES = 2 * 1024 * 1024  # enough to hit a full disk or a file-size limit that stopped a real writer

# ``hook(operation, when, path, written)``: operation "write" | "create" | "rename" | "remove"; when "before" |
# "during" | "after"; ``written`` is the file on disk so far (a write's temporary file, "during" only).
FaultHook = Callable[[str, str, str, "str | None"], None]
_fault_hook: FaultHook | None = None


def set_fault_hook(hook: FaultHook | None) -> None:
    """Install (or, with None, remove) the function that this module's file operations report to."""
    global _fault_hook
    _fault_hook = hook


def fault_point(operation: str, when: str, path: str | os.PathLike, written: str | None = None) -> None:
    """Report a point of a file operation to the installed hook (nothing when none is installed)."""
    if _fault_hook is not None:
        _fault_hook(operation, when, os.fspath(path), written)


# --- flushing -----------------------------------------------------------------------------------------------------


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (new, renamed or removed names) to the disk."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_file(path: str) -> None:
    """Flush a file that someone else (a library) wrote to the disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def file_creation_mask() -> int:
    """The process's umask (from /proc where it can be read; ``os.umask`` can only be read by setting it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_tree(root: str) -> None:
    """Flush every file under ``root``, then every folder bottom-up (so each name points at flushed data).

    Every file also gets the read and write permissions the umask allows (never fewer than it had): safetensors
    writes its files 0600, so a model shared in a cluster folder would be unreadable to the others while every
    other file of it is 0644. This runs on every checkpoint and export before it is renamed into place.
    """
    allowed = 0o666 & ~file_creation_mask()
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(folder, name)
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            if mode | allowed != mode and not os.path.islink(path):
                os.chmod(path, mode | allowed)
            fsync_file(path)
        fsync_dir(folder)


# --- files --------------------------------------------------------------------------------------------------------


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a hidden temporary file beside `path`; when the block ends without an error, flush and fsync it, rename
    it over `path` and fsync the folder. On an error the temporary file is removed and `path` is untouched.

    Args:
        path: The final name; its folder must exist.
        mode: ``"wb"`` or ``"w"`` (UTF-8 text).
    """
    folder, name = os.path.split(os.path.abspath(path))
    fault_point("write", "before", path)
    temporary = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
    # O_EXCL: never follow or reuse a name someone else put there; 0o666 leaves the permissions to the umask.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        fault_point("write", "during", path, written=temporary)  # on disk, not yet under its name
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    fsync_dir(folder)
    fault_point("write", "after", path)


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of ``data``."""
    with atomic_file(path, "wb") as handle:
        handle.write(data)


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


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 8 * 1024 * 1024) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


# --- folders ------------------------------------------------------------------------------------------------------


def hidden_sibling(path: str, tag: str) -> str:
    """A unique hidden name beside ``path``: ``<parent>/.<name>.<tag>-<time>-<pid>``."""
    parent, name = os.path.split(os.path.normpath(path))
    return os.path.join(parent, f".{name}.{tag}-{time.time_ns():x}-{os.getpid()}")


def make_hidden_folder(final: str, tag: str = "tmp") -> str:
    """Create (and return) an empty hidden folder beside ``final`` to write a folder in before it is renamed."""
    temporary = hidden_sibling(final, tag)
    fault_point("create", "before", temporary)
    os.mkdir(temporary)
    return temporary


def rename_into_place(temporary: str, final: str) -> None:
    """Rename a finished temporary folder (or file) to its final name, which must not exist yet."""
    if os.path.lexists(final):  # os.rename would replace an empty folder or a file silently
        raise FileExistsError(f"{final} already exists; refusing to replace it")
    fault_point("rename", "before", final)
    os.rename(temporary, final)
    fsync_dir(os.path.dirname(os.path.abspath(final)))
    fault_point("rename", "after", final)


def replace_folder(temporary: str, final: str) -> None:
    """Put a finished folder at ``final``, replacing an older one; ``final`` is never a partial folder."""
    fsync_tree(temporary)
    parent = os.path.dirname(os.path.abspath(final))
    old = None
    if os.path.lexists(final):
        old = hidden_sibling(final, "old")
        os.rename(final, old)
    fault_point("rename", "before", final)
    os.rename(temporary, final)
    fsync_dir(parent)
    fault_point("rename", "after", final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_tree(path: str) -> None:
    """Remove a folder so that no half-deleted copy is ever visible under its name (hide it, then delete)."""
    fault_point("remove", "before", path)
    hidden = hidden_sibling(path, "deleting")
    os.rename(path, hidden)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    fault_point("remove", "during", path)
    shutil.rmtree(hidden)


# --- why a write failed -------------------------------------------------------------------------------------------


def describe_os_error(error: OSError, path: str | None = None) -> str:
    """``<reason>: <path>`` as the OS says it, e.g. ``No space left on device: /runs/x/optimizer.bin``."""
    reason = error.strerror or (os.strerror(error.errno) if error.errno else str(error))
    where = error.filename or path
    return f"{reason}: {where}" if where else reason


def probe_write(folder: str) -> OSError | None:
    """Try to write and fsync a few MiB in ``folder``; the OS's error if that fails (full disk, quota, ...).

    Some writers (torch.save's C++ stream, safetensors) replace the OS's error with their own text, e.g.
    ``basic_ios::clear: iostream error``; writing from Python again recovers the real reason.
    """
    probe = os.path.join(folder, f".write-probe-{os.getpid()}")
    try:
        with open(probe, "wb") as handle:
            block = bytes(64 * 1024)
            for _ in range(PROBE_BYTES // len(block)):
                handle.write(block)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        return error
    finally:
        try:
            os.remove(probe)
        except OSError:
            pass
    return None


def reason_for_write_failure(error: BaseException, folder: str) -> str:
    """The clearest reason a write into ``folder`` failed: the OS's, when it can be found."""
    if isinstance(error, OSError):
        return describe_os_error(error)
    probed = probe_write(folder) if os.path.isdir(folder) else None
    if probed is not None:  # name the folder being written, not the probe file
        return describe_os_error(OSError(probed.errno, probed.strerror), folder)
    return f"{type(error).__name__}: {error}"
