"""The run's output folder: one trainer at a time, refusing to reuse one by accident, clearing it on request, and
its log history.

A folder that holds a run (``checkpoints/``, ``log_history.jsonl`` or ``model/``) is refused unless the command
says what to do with it: ``--resume`` continues that run, ``--overwrite_output_dir true`` removes it first. The
check runs before anything is written, so a refused command changes nothing.

While a trainer uses a folder it holds an exclusive ``flock`` on ``<output_dir>/trainer.lock`` (which records its
host and pid). The kernel drops the lock when the process ends, however it ends (``kill -9`` included), so no stale
lock is ever left; a second trainer on the same folder is refused at once, naming the first.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, gather_object

from backpack.checkpoints import CHECKPOINTS_DIR
from backpack.files import remove_tree, write_bytes_atomically
from backpack_train.export import FINAL_EXPORT_DIR

LOG_HISTORY_FILE = "log_history.jsonl"
LOGS_DIR = "logs"
RUN_MARKERS = (CHECKPOINTS_DIR, LOG_HISTORY_FILE, FINAL_EXPORT_DIR)  # what makes a folder "used"


LOCK_FILE = "trainer.lock"


class OutputDirError(Exception):
    """The output folder holds an earlier run and the command did not say to resume or overwrite it, or another
    trainer is using it."""


class RunLock:
    """An exclusive ``flock`` on ``<output_dir>/trainer.lock``, held from :meth:`acquire` to :meth:`release` (or the
    process's end). The file says who holds it: ``{"host", "pid", "since", "token"}``."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.token: str | None = None  # set while held: what this holder wrote into the file
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`OutputDirError` naming the trainer that holds it (never waits)."""
        os.makedirs(self.output_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputDirError(
                f"{self.output_dir} is in use by another trainer ({describe_holder(self.path)}): one run per output "
                f"folder. Wait for it to finish or stop it, or choose another --output_dir.") from None
        except OSError as error:
            os.close(fd)
            raise OutputDirError(f"cannot lock {self.path}: {error.strerror}") from error
        self.token = uuid.uuid4().hex
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S %z"), "token": self.token}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)  # other machines sharing the folder read it to learn that this process holds it
        self._fd = fd

    def release(self) -> None:
        """Let go of the lock (the file stays: removing it would race with a trainer that just opened it)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd, self.token = None, None


def read_lock_record(path: str) -> dict:
    """What the holder of ``path`` wrote about itself ({} when nothing readable is there yet)."""
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.loads(handle.read() or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def describe_holder(path: str) -> str:
    record = read_lock_record(path)
    if "host" not in record:
        return f"it has not written its host and pid into {path} yet"
    return f"host {record['host']}, pid {record.get('pid')}, since {record.get('since')}; recorded in {path}"


@contextmanager
def locked_output_dir(output_dir: str, distributed: PartialState) -> Iterator[RunLock]:
    """Hold the output folder's lock for the duration of a run; every process must enter this together.

    Yields this process's :class:`RunLock` (its ``token`` is None on the processes that do not hold it).

    The main process locks the folder. With several machines the folder is either shared (one file system:
    the other machines see the main process's lock record, and lock nothing) or one per machine (each machine's
    first process finds no such record in its own folder and locks that). A refusal anywhere stops every process
    with the same :class:`OutputDirError`.
    """
    lock, error = RunLock(output_dir), None
    if distributed.is_main_process:
        try:
            lock.acquire()
        except OutputDirError as refused:
            error = str(refused)
    if distributed.num_processes > 1:
        error, main_token = broadcast_object_list([error, lock.token])
        if error is None and distributed.is_local_main_process and not distributed.is_main_process:
            if read_lock_record(lock.path).get("token") != main_token:  # this machine's own folder
                try:
                    lock.acquire()
                except OutputDirError as refused:
                    error = str(refused)
        errors = [found for found in gather_object([error]) if found is not None]
        error = errors[0] if errors else None
    try:
        if error is not None:
            raise OutputDirError(error)
        yield lock
    finally:
        lock.release()


def run_markers(output_dir: str) -> list[str]:
    """The names in ``output_dir`` that show an earlier run used it."""
    return [name for name in RUN_MARKERS if os.path.lexists(os.path.join(output_dir, name))]


def check_output_dir(output_dir: str, resume: str | None, overwrite: bool) -> None:
    """Refuse a used output folder unless ``--resume`` or ``--overwrite_output_dir`` says what to do with it."""
    if resume is not None and overwrite:
        raise OutputDirError("--resume and --overwrite_output_dir contradict each other: resume the run in "
                             f"{output_dir}, or overwrite it, not both")
    used = run_markers(output_dir)
    if used and resume is None and not overwrite:
        raise OutputDirError(
            f"{output_dir} already holds a run ({', '.join(used)}). Continue it with --resume latest, start over "
            "with --overwrite_output_dir true (removes checkpoints/, model/, logs/ and log_history.jsonl), or "
            "choose another --output_dir."
        )


def clear_output_dir(output_dir: str, say: Callable[[str], None] = print) -> None:
    """Remove an earlier run's checkpoints, export, logs and log history (``--overwrite_output_dir``)."""
    removed = []
    for name in (*RUN_MARKERS, LOGS_DIR):
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            remove_tree(path)
        elif os.path.lexists(path):
            os.remove(path)
        else:
            continue
        removed.append(name)
    if removed:
        say(f"--overwrite_output_dir: removed the earlier run's {', '.join(removed)} from {output_dir}")


class LogHistory:
    """``log_history.jsonl`` in the output folder: one JSON line per logged step or evaluation (main process)."""

    def __init__(self, accelerator: Accelerator, output_dir: str):
        self.accelerator = accelerator
        self.path = os.path.join(output_dir, LOG_HISTORY_FILE)
        os.makedirs(output_dir, exist_ok=True)

    def write(self, record: dict, step: int) -> None:
        self.accelerator.log(record, step=step)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"step": step, **record}) + "\n")

    def cut_after(self, step: int) -> int:
        """Drop the records past ``step`` (a resumed run logs them again); returns how many were dropped.

        Lines a crash left unfinished are dropped too, so the file stays one history of one run.
        """
        if not self.accelerator.is_main_process or not os.path.isfile(self.path):
            return 0
        with open(self.path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line)
        if len(kept) != len(lines):
            write_bytes_atomically(self.path, "".join(line + "\n" for line in kept).encode("utf-8"))
        return len(lines) - len(kept)

