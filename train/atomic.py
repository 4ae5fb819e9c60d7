"""Crash-safe writes: a hidden temporary name beside the final one, fsync, then one rename into place.

A reader never finds a half-written file or folder under its final name. Everything is first written under a
hidden temporary name in the same folder (so the rename stays on one file system and is atomic), flushed to the
disk with ``fsync``, and renamed; the parent folder is then fsynced too, so that the rename itself survives a
power cut. Deletions go the other way: rename out of sight first, then remove. Failures keep the operating
system's own reason (``No space left on device: <path>``), also when a library's writer hides it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import time

from backpack.files import atomic_file, fsync_dir
from backpack_train import faults

PROBE_BYTES = 2 * 1024 * 1024  # enough to hit a full disk or a file-size limit that stopped a real writer


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


def hidden_sibling(path: str, tag: str) -> str:
    """A unique hidden name beside ``path``: ``<parent>/.<name>.<tag>-<time>-<pid>``."""
    parent, name = os.path.split(os.path.normpath(path))
    return os.path.join(parent, f".{name}.{tag}-{time.time_ns():x}-{os.getpid()}")


def write_bytes_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of ``data``."""
    faults.at_file("before", path)
    with atomic_file(path, "wb", on_written=lambda temporary: faults.at_file("during", path, written=temporary)) as out:
        out.write(data)
    faults.at_file("after", path)


def write_json_atomically(path: str, value: object) -> None:
    """``json.dump`` through :func:`write_bytes_atomically` (indented, so people can read it)."""
    write_bytes_atomically(path, (json.dumps(value, indent=2) + "\n").encode("utf-8"))


def rename_into_place(temporary: str, final: str) -> None:
    """Rename a finished temporary folder (or file) to its final name, which must not exist yet."""
    if os.path.lexists(final):  # os.rename would replace an empty folder or a file silently
        raise FileExistsError(f"{final} already exists; refusing to replace it")
    os.rename(temporary, final)
    fsync_dir(os.path.dirname(os.path.abspath(final)))


def remove_tree(path: str) -> None:
    """Remove a folder so that no half-deleted copy is ever visible under its name (hide it, then delete)."""
    hidden = hidden_sibling(path, "deleting")
    os.rename(path, hidden)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    faults.at("during", "remove")
    shutil.rmtree(hidden)


def file_sha256(path: str, chunk_bytes: int = 8 * 1024 * 1024) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


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
