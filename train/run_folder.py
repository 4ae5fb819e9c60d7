"""The run's output folder: refusing to reuse one by accident, clearing it on request, and its log history.

A folder that holds a run (``checkpoints/``, ``log_history.jsonl`` or ``model/``) is refused unless the command
says what to do with it: ``--resume`` continues that run, ``--overwrite_output_dir true`` removes it first. The
check runs before anything is written, so a refused command changes nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from accelerate import Accelerator

from backpack_train.atomic import remove_tree, write_bytes_atomically
from backpack_train.checkpointing import CHECKPOINTS_DIR
from backpack_train.export import FINAL_EXPORT_DIR

LOG_HISTORY_FILE = "log_history.jsonl"
LOGS_DIR = "logs"
RUN_MARKERS = (CHECKPOINTS_DIR, LOG_HISTORY_FILE, FINAL_EXPORT_DIR)  # what makes a folder "used"


class OutputDirError(Exception):
    """The output folder holds an earlier run and the command did not say to resume or overwrite it."""


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

