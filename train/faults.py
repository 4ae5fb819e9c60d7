"""Deterministic fault injection for the crash tests; inert unless ``BACKPACK_FAULT`` is set.

The trainer marks the points of a save where a crash, a full disk or a second signal could leave something
behind (:func:`at` for stages, :func:`at_file` around every file written into a checkpoint). ``BACKPACK_FAULT``
names one or more of those points, comma separated, and what happens there::

    [ACTION@]WHEN:TARGET[#N]

    WHEN    before | during | after
    TARGET  a file of the checkpoint being saved, relative to its folder: model.safetensors, optimizer.bin,
            scheduler.bin, rng_state_0.safetensors, training_state.json, model/model.safetensors,
            checkpoint.json ...; a file of the final export: export/model.safetensors ...; or a stage:
              save     a whole checkpoint save          model/   its exported HF folder
              rename   its rename into place            prune    removing checkpoints past the limit
              remove   one folder hidden, not deleted   export   the final <output_dir>/model
              step     one optimizer step
    N       the N-th time this process reaches that point (default 1)
    ACTION  kill    SIGKILL, as `kill -9` (default)
            sigterm send SIGTERM to this process (a first or second signal, as a user would)
            enospc  raise OSError(ENOSPC), as a full disk does
            fsize   cap the file size at 1 MiB from here on, so the libraries' own writers fail for real

``during`` a file (kill, enospc) cuts that file to half its length first: the state a crash or a full disk leaves
while writing it.
Examples: ``after:optimizer.bin``, ``during:model/model.safetensors#2``, ``enospc@during:optimizer.bin#2``,
``sigterm@after:step#3,sigterm@after:optimizer.bin#2``.

Files that Accelerate and transformers write are observed by wrapping their writers (``torch.save`` and
safetensors' ``save_file`` as those libraries call them) while :func:`watch` is active, and only then, and only
when ``BACKPACK_FAULT`` is set: a normal run is never patched.
"""

from __future__ import annotations

import errno
import functools
import importlib
import os
import re
import signal
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

ENV = "BACKPACK_FAULT"
ACTIONS = ("kill", "sigterm", "enospc", "fsize")
FILE_SIZE_LIMIT = 1024 * 1024  # fsize: small enough for any weights file, large enough for logs
_SPEC = re.compile(r"^(?:(?P<action>[a-z]+)@)?(?P<when>before|during|after):(?P<target>[^#]+?)(?:#(?P<n>\d+))?$")

# (module, attribute, name of the path argument, its position): the writers Accelerate and transformers call.
LIBRARY_WRITERS = (
    ("torch", "save", "f", 1),
    ("accelerate.utils.other", "safe_save_file", "filename", 1),
    ("transformers.modeling_utils", "safe_save_file", "filename", 1),
)


@dataclass(frozen=True)
class Fault:
    """One entry of ``BACKPACK_FAULT``."""

    action: str
    when: str
    target: str
    occurrence: int

    @property
    def spec(self) -> str:
        return f"{self.action}@{self.when}:{self.target}#{self.occurrence}"


def parse(value: str) -> list[Fault]:
    """The faults that a ``BACKPACK_FAULT`` value names (empty: none); a malformed entry is an error."""
    faults = []
    for entry in filter(None, (part.strip() for part in value.split(","))):
        match = _SPEC.match(entry)
        if match is None or (match["action"] or "kill") not in ACTIONS:
            raise ValueError(f"{ENV}: cannot read {entry!r}; expected [ACTION@]WHEN:TARGET[#N] with ACTION one of "
                             f"{', '.join(ACTIONS)} and WHEN before, during or after")
        faults.append(Fault(match["action"] or "kill", match["when"], match["target"].strip(), int(match["n"] or 1)))
    return faults


_faults: list[Fault] | None = None  # read from the environment on first use
_reached: Counter = Counter()
_scopes: list[tuple[str, str]] = []  # (folder being written, prefix of its targets)


def active() -> list[Fault]:
    """The faults of this process (``BACKPACK_FAULT``, read once)."""
    global _faults
    if _faults is None:
        _faults = parse(os.environ.get(ENV, ""))
    return _faults


def at(when: str, stage: str, path: str | None = None) -> None:
    """Mark a stage point (``at("after", "rename")``); acts if ``BACKPACK_FAULT`` names it."""
    if active():
        _reach(when, stage, path, written=None)


def at_file(when: str, path: str, written: str | None = None) -> None:
    """Mark a point around the write of ``path``; ``written`` is the file on disk so far (for ``during``)."""
    if not active() or not _scopes:
        return
    root, prefix = _scopes[-1]
    relative = os.path.relpath(os.path.abspath(path), root)
    if relative.startswith(os.pardir):
        return
    _reach(when, prefix + relative.replace(os.sep, "/"), path, written=written or path)


def _reach(when: str, target: str, path: str | None, written: str | None) -> None:
    _reached[(when, target)] += 1
    for fault in active():
        if (fault.when, fault.target, fault.occurrence) == (when, target, _reached[(when, target)]):
            _act(fault, path, written)


def _act(fault: Fault, path: str | None, written: str | None) -> None:
    if fault.when == "during" and fault.action in ("kill", "enospc") and written and os.path.isfile(written):
        size = os.path.getsize(written)
        with open(written, "r+b") as handle:
            handle.truncate(size // 2)
            os.fsync(handle.fileno())
    print(f"[fault injected: {fault.spec}]", file=sys.stderr, flush=True)
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.action == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler right after this call returns
    elif fault.action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path or fault.target)
    elif fault.action == "fsize":
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


@contextmanager
def watch(folder: str, prefix: str = "") -> Iterator[None]:
    """Name the files written under ``folder`` ``prefix + relative path``, the libraries' writes included."""
    if not active():
        yield
        return
    _scopes.append((os.path.abspath(folder), prefix))
    originals = []
    try:
        for module_name, attribute, keyword, position in LIBRARY_WRITERS:
            module = importlib.import_module(module_name)
            if not hasattr(module, attribute):  # a library changed: the crash tests must not pass vacuously
                raise RuntimeError(f"{ENV}: cannot observe {module_name}.{attribute}, which no longer exists")
            original = getattr(module, attribute)
            originals.append((module, attribute, original))
            setattr(module, attribute, _observed(original, keyword, position))
        yield
    finally:
        for module, attribute, original in reversed(originals):
            setattr(module, attribute, original)
        _scopes.pop()


def _observed(writer, keyword: str, position: int):
    """``writer`` with fault points before, during and after the file it writes."""

    @functools.wraps(writer)
    def write(*args, **kwargs):
        path = kwargs.get(keyword, args[position] if len(args) > position else None)
        if not isinstance(path, (str, os.PathLike)):  # a buffer, not a file
            return writer(*args, **kwargs)
        path = os.fspath(path)
        at_file("before", path)
        result = writer(*args, **kwargs)
        at_file("during", path)
        at_file("after", path)
        return result

    return write
