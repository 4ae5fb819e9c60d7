"""Deterministic fault injection for the crash tests; inert unless ``BACKPACK_FAULT`` is set.

Faults are injected at one boundary: the crash-safe file module (``backpack.files``), whose writes, folder
creations, renames into place and removals report to the hook that :func:`install` sets there, and the writers of
Accelerate and transformers (``torch.save`` and safetensors' ``save_file`` as those libraries call them), which
:func:`install` wraps so that they report the same way. The one other point is the end of an optimizer step
(:func:`at`). A file is named by its place in the checkpoint or export being written, so the trainer itself marks
nothing. ``BACKPACK_FAULT`` names one or more of those points, comma separated, and what happens there::

    [ACTION@]WHEN:TARGET[#N]

    WHEN    before | during | after
    TARGET  a file of the checkpoint being saved, relative to its folder: model.safetensors, optimizer.bin,
            scheduler.bin, rng_state_0.safetensors, training_state.json, model/model.safetensors,
            checkpoint.json ...; a file of the final export: export/model.safetensors ...; or a stage:
              before:save     a checkpoint save starts (its hidden folder is created)
              after:model/    everything of the checkpoint is written but its manifest (= before:checkpoint.json)
              rename          the checkpoint's rename into place (before, after)
              before:prune    a checkpoint past the limit is about to be removed
              during:remove   a folder being removed is hidden, not yet deleted
              after:export    the final export is in place
              after:step      one optimizer step is done
    N       the N-th time this process reaches that point (default 1)
    ACTION  kill    SIGKILL, as `kill -9` (default)
            sigterm send SIGTERM to this process (a first or second signal, as a user would)
            enospc  raise OSError(ENOSPC), as a full disk does
            fsize   cap the file size at 1 MiB from here on, so the libraries' own writers fail for real

``during`` a file (kill, enospc) cuts that file to half its length first: the state a crash or a full disk leaves
while writing it.
Examples: ``after:optimizer.bin``, ``during:model/model.safetensors#2``, ``enospc@during:optimizer.bin#2``,
``sigterm@after:step#3,sigterm@after:optimizer.bin#2``.

Nothing is installed or patched unless ``BACKPACK_FAULT`` is set: a normal run is never observed.
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
from dataclasses import dataclass

from backpack import files
from backpack.checkpoints import EXPORT_DIR, MANIFEST_FILE

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


# The hidden folders a checkpoint and the final export are written in (backpack.files.hidden_sibling), and the
# prefix that names the files written inside them.
_WRITTEN_FOLDERS = ((re.compile(r"\.checkpoint_\d+\.tmp-.+"), ""), (re.compile(r"\.model\.tmp-.+"), "export/"))
_CHECKPOINT = re.compile(r"checkpoint_\d+")

_faults: list[Fault] | None = None  # read from the environment on first use
_reached: Counter = Counter()
_installed = False


def active() -> list[Fault]:
    """The faults of this process (``BACKPACK_FAULT``, read once)."""
    global _faults
    if _faults is None:
        _faults = parse(os.environ.get(ENV, ""))
    return _faults


def install() -> None:
    """Observe the file module and the libraries' writers, if ``BACKPACK_FAULT`` names any fault (else nothing)."""
    global _installed
    if _installed or not active():
        return
    for module_name, attribute, keyword, position in LIBRARY_WRITERS:
        module = importlib.import_module(module_name)
        if not hasattr(module, attribute):  # a library changed: the crash tests must not pass vacuously
            raise RuntimeError(f"{ENV}: cannot observe {module_name}.{attribute}, which no longer exists")
        setattr(module, attribute, _observed(getattr(module, attribute), keyword, position))
    files.set_fault_hook(_on_file_operation)
    _installed = True


def at(when: str, stage: str) -> None:
    """Mark a point that is no file operation (``at("after", "step")``); acts if ``BACKPACK_FAULT`` names it."""
    if active():
        _reach(when, stage, None, written=None)


def target_of(path: str) -> str | None:
    """The name of a file being written into a checkpoint or the final export (None: any other file)."""
    parts = os.path.abspath(path).split(os.sep)
    for index in range(len(parts) - 2, -1, -1):
        for pattern, prefix in _WRITTEN_FOLDERS:
            if pattern.fullmatch(parts[index]):
                return prefix + "/".join(parts[index + 1:])
    return None


def _on_file_operation(operation: str, when: str, path: str, written: str | None) -> None:
    """The hook of ``backpack.files``: a file operation's point, named as ``BACKPACK_FAULT`` names it."""
    name = os.path.basename(os.path.normpath(path))
    if operation == "write":
        target = target_of(path)
        if target is None:
            return
        if (when, target) == ("before", MANIFEST_FILE):  # the last file: all else is written
            _reach("after", "model/", path, written=None)
        _reach(when, target, path, written=written or path)
    elif operation == "create" and when == "before" and _WRITTEN_FOLDERS[0][0].fullmatch(name):
        _reach("before", "save", path, written=None)
    elif operation == "rename" and _CHECKPOINT.fullmatch(name):
        _reach(when, "rename", path, written=None)
    elif operation == "rename" and when == "after" and name == EXPORT_DIR:
        _reach("after", "export", path, written=None)
    elif operation == "remove":
        if when == "before" and _CHECKPOINT.fullmatch(name):
            _reach("before", "prune", path, written=None)
        elif when == "during":
            _reach("during", "remove", path, written=None)


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


def _observed(writer, keyword: str, position: int):
    """``writer`` reporting before, during (the file complete, as a crash could leave it) and after its file."""

    @functools.wraps(writer)
    def write(*args, **kwargs):
        path = kwargs.get(keyword, args[position] if len(args) > position else None)
        if not isinstance(path, (str, os.PathLike)):  # a buffer, not a file
            return writer(*args, **kwargs)
        path = os.fspath(path)
        _on_file_operation("write", "before", path, None)
        result = writer(*args, **kwargs)
        _on_file_operation("write", "during", path, None)
        _on_file_operation("write", "after", path, None)
        return result

    return write
