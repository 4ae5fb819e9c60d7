"""Checkpoints that survive any crash: written out of sight, verified, renamed into place, pruned only afterwards.

This module writes checkpoints and resumes from them; their format is read by ``backpack.checkpoints``, which the
Hub tool shares, and every file goes through the crash-safe writes of ``backpack.files``.

A checkpoint is the folder ``<output_dir>/checkpoints/checkpoint_<i>`` (``i`` counts saves: 0, 1, 2 ...; the step
is in its ``training_state.json``). It holds

* Accelerate's ``save_state``: ``model.safetensors``, ``optimizer.bin``, ``scheduler.bin`` (and ``scaler.pt`` with
  fp16). Accelerate reads the ``.bin``/``.pt`` files with ``torch.load(weights_only=True)``. Under FSDP the trainer
  writes ``model.safetensors`` and ``optimizer.bin`` itself, gathered, in the same layout (train/parallel.py), so
  a checkpoint of any topology resumes under any other.
* ``rng_state_<process>.safetensors``: every process's generator states (tensors + JSON, see train/rng.py),
  instead of Accelerate's pickled ``random_states_<process>.pkl``, which is removed.
* ``training_state.json``: the run's position in global units, ``{"step", "sequences", "tokens",
  "sequences_per_step"}``: optimizer steps done, sequences of the data order read (train/data_order.py), tokens
  seen, and the global batch of the last step; nothing depends on how a step was split over processes.
* ``model/``: the exported Hugging Face folder of these weights.
* ``checkpoint.json``, the manifest, written last: ``{"format": 1, "step": ..., "files": {path: {"bytes": ...,
  "sha256": ...}}}``. A checkpoint is complete when its manifest exists and every file matches it.

A save writes everything into a hidden ``checkpoints/.checkpoint_<i>.tmp-*`` folder, fsyncs it, checks that each
file reads back (safetensors and torch.save headers, JSON), writes the manifest, and renames the folder into place
in one step; only then are checkpoints past ``--save_total_limit`` removed (newest complete ones are kept;
folders that are not complete are never deleted by the trainer). Resuming verifies sizes and SHA-256 first and
refuses a checkpoint holding any file its manifest does not list, so that nothing added later (a crafted
``custom_checkpoint_0.pkl``, which Accelerate would unpickle) is ever loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from backpack.checkpoints import (
    CHECKPOINT_NAME,
    EXPORT_DIR,
    FORMAT,
    MANIFEST_FILE,
    STATE_FILE,
    CheckpointError,
    TrainingState,
    checkpoint_dirs,
    checkpoints_root,
    newest_complete,
    read_manifest,
    relative_files,
    verify_checkpoint,
)
from backpack.files import (
    describe_os_error,
    file_sha256,
    fsync_tree,
    make_hidden_folder,
    reason_for_write_failure,
    remove_tree,
    rename_into_place,
    write_json_atomically,
)
from backpack_train.rng import load_rng_state, rng_file_name, save_rng_state

_HIDDEN_NAME = re.compile(r"\.checkpoint_(\d+)\.(?:tmp|deleting)-.+")  # an interrupted save or removal
_ACCELERATE_RNG_FILE = re.compile(r"random_states_\d+\.pkl")


class SavesItself(Protocol):
    """Writes and reads the model and optimizer files of a checkpoint itself (an FSDP run: train/parallel.py)."""

    def save(self, folder: str) -> None: ...

    def load(self, folder: str) -> None: ...


@dataclass
class ResumePoint:
    """A verified checkpoint to continue from, and the run's position stored in it."""

    path: str
    state: TrainingState


# --- reading ---------------------------------------------------------------------------------------------------


def describe_newest(output_dir: str) -> str:
    """One sentence naming the newest complete checkpoint on disk, or saying there is none."""
    newest = newest_complete(output_dir)
    if newest is None:
        return f"No complete checkpoint exists yet in {checkpoints_root(output_dir)}."
    return f"The newest complete checkpoint is {newest[0]} (step {newest[1]})."


def find_resume_point(resume: str | None, output_dir: str) -> tuple[ResumePoint | None, list[str]]:
    """The checkpoint that ``--resume`` names, verified, and why newer ones were skipped.

    ``latest``: the newest complete, intact checkpoint of ``output_dir``, skipping incomplete or corrupt ones
    (their reasons are returned); None when the folder has no checkpoint at all (a new run). A path: that
    checkpoint, or an error saying why not.

    Raises:
        CheckpointError: ``latest`` found checkpoints but none that can be resumed. The run is not started over on
            top of them (its saves would prune them): the message names each one and why, and says how to start
            over. Nothing is changed.
    """
    if resume is None:
        return None, []
    if resume == "latest":
        skipped = []
        folders = checkpoint_dirs(output_dir)
        for path in reversed(folders):
            try:
                return ResumePoint(path, verify_checkpoint(path)), skipped
            except CheckpointError as error:
                skipped.append(str(error))
        if folders:
            raise CheckpointError(
                f"--resume latest: none of the {len(folders)} checkpoint(s) in {checkpoints_root(output_dir)} can be "
                f"resumed ({'; '.join(reversed(skipped))}). Nothing was changed. Repair or restore one (or resume it "
                "with --resume PATH once it verifies), or start over with --overwrite_output_dir true, which removes "
                "them."
            )
        return None, skipped
    if not os.path.isdir(resume):
        raise CheckpointError(f"--resume {resume}: no such checkpoint folder")
    try:
        return ResumePoint(resume, verify_checkpoint(resume)), []
    except CheckpointError as error:
        raise CheckpointError(f"--resume {resume}: cannot resume from it: {error}") from error


def check_readable(path: str) -> None:
    """Check that a file just written reads back: safetensors and torch.save headers, JSON syntax."""
    size = os.path.getsize(path)
    if path.endswith(".safetensors"):
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            header_bytes = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if not 0 <= header_bytes <= size - 8:
                raise CheckpointError(f"{path}: not a complete safetensors file ({size:,} bytes)")
            try:
                header = json.loads(handle.read(header_bytes))
                data_bytes = max((entry["data_offsets"][1] for name, entry in header.items()
                                  if name != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError) as error:
                raise CheckpointError(f"{path}: unreadable safetensors header ({error})") from error
        if 8 + header_bytes + data_bytes != size:
            raise CheckpointError(f"{path}: {size:,} bytes, its safetensors header describes "
                                  f"{8 + header_bytes + data_bytes:,}")
    elif path.endswith((".bin", ".pt", ".pth")):  # torch.save's zip archive: its directory sits at the end
        try:
            with zipfile.ZipFile(path) as archive:
                if any(info.header_offset + info.compress_size > size for info in archive.infolist()):
                    raise zipfile.BadZipFile("an entry runs past the end of the file")
        except zipfile.BadZipFile as error:
            raise CheckpointError(f"{path}: not a complete torch.save archive ({error})") from error
    elif path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as handle:
                json.load(handle)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path}: not valid JSON ({error})") from error


# --- writing ---------------------------------------------------------------------------------------------------


def next_checkpoint_index(root: str) -> int:
    """One more than any ``checkpoint_<i>`` (complete or not) or interrupted save in ``root``: never reused."""
    indices = [-1]
    for name in os.listdir(root) if os.path.isdir(root) else []:
        match = CHECKPOINT_NAME.fullmatch(name) or _HIDDEN_NAME.fullmatch(name)
        if match:
            indices.append(int(match.group(1)))
    return max(indices) + 1


def remove_leftovers(root: str, say: Callable[[str], None]) -> None:
    """Delete the hidden folders of saves or removals that a crash interrupted (never a checkpoint)."""
    for name in sorted(os.listdir(root)):
        if _HIDDEN_NAME.fullmatch(name):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            say(f"removed {os.path.join(root, name)}, left by an interrupted save")


def write_manifest(folder: str, step: int) -> None:
    """Flush every file of a finished checkpoint folder, check each reads back, then write the manifest last."""
    fsync_tree(folder)
    files = {}
    for relative in sorted(relative_files(folder)):
        full = os.path.join(folder, relative)
        check_readable(full)
        files[relative] = {"bytes": os.path.getsize(full), "sha256": file_sha256(full)}
    write_json_atomically(os.path.join(folder, MANIFEST_FILE), {"format": FORMAT, "step": step, "files": files})


def save_checkpoint(accelerator: Accelerator, output_dir: str, state: TrainingState,
                    write_export: Callable[[str], None], keep: int | None,
                    say: Callable[[str], None] = print, sharded: SavesItself | None = None) -> str:
    """Save a complete checkpoint or nothing; returns its folder. Every process must call this.

    ``write_export(folder)`` writes the HF export into ``folder`` (all processes call it: FSDP gathers weights).
    ``sharded`` writes the model's and optimizer's files of an FSDP run, which Accelerate does not hold.
    Checkpoints past ``keep`` (oldest first) are removed after the new one is in place.

    Raises:
        CheckpointError: the save failed (the OS's reason, e.g. ``No space left on device: <path>``); the
            temporary folder is removed and every earlier checkpoint is untouched.
    """
    root = checkpoints_root(output_dir)
    names: list[str | None] = [None, None]
    if accelerator.is_main_process:
        try:
            os.makedirs(root, exist_ok=True)
            remove_leftovers(root, say)
            final = os.path.join(root, f"checkpoint_{next_checkpoint_index(root)}")
            temporary = make_hidden_folder(final)
        except OSError as error:  # e.g. a read-only or full file system: nothing was written
            raise CheckpointError(f"could not save the checkpoint at step {state.step}: {describe_os_error(error)}. "
                                  f"{describe_newest(output_dir)}") from error
        names = [temporary, final]
    temporary, final = broadcast_object_list(names)  # every process writes into the same temporary folder
    renamed = False
    try:
        accelerator.save_state(output_dir=temporary)
        if sharded is not None:
            sharded.save(temporary)
        save_rng_state(os.path.join(temporary, rng_file_name(accelerator.process_index)))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for name in os.listdir(temporary):
                if _ACCELERATE_RNG_FILE.fullmatch(name):  # a pickle; rng_state_<i>.safetensors replaces it
                    os.remove(os.path.join(temporary, name))
            write_json_atomically(os.path.join(temporary, STATE_FILE), state.state_dict())
        write_export(os.path.join(temporary, EXPORT_DIR))
        if accelerator.is_main_process:
            write_manifest(temporary, state.step)
            rename_into_place(temporary, final)
            renamed = True
    except Exception as error:
        if renamed:  # the checkpoint is complete; what failed came after it
            raise
        reason = reason_for_write_failure(error, temporary)
        _discard(accelerator, temporary)
        raise CheckpointError(f"could not save the checkpoint at step {state.step}: {reason}. Its temporary folder "
                              f"was removed and earlier checkpoints are untouched. {describe_newest(output_dir)}"
                              ) from error
    except BaseException:  # a second signal or SystemExit: no half-written folder stays behind
        if not renamed:
            _discard(accelerator, temporary)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        prune_checkpoints(output_dir, keep, just_saved=final, say=say)
    return final


def _discard(accelerator: Accelerator, temporary: str) -> None:
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)


def prune_checkpoints(output_dir: str, keep: int | None, just_saved: str | None = None,
                      say: Callable[[str], None] = print) -> list[str]:
    """Remove complete checkpoints past the newest ``keep`` intact ones; returns the removed folders.

    Only checkpoints that verify count towards ``keep``. A folder without a manifest (an incomplete save, or not
    this trainer's) is never removed: the trainer names it when resuming, and it is the user's to inspect.
    """
    if keep is None:
        return []
    kept, removed = 0, []
    for path in reversed(checkpoint_dirs(output_dir)):
        if kept < keep:
            try:
                if path != just_saved:
                    verify_checkpoint(path)
                kept += 1
            except CheckpointError:
                pass
            continue
        try:
            read_manifest(path)
        except CheckpointError:
            continue
        try:
            remove_tree(path)
        except OSError as error:  # the new checkpoint is safe; a checkpoint too many is no reason to stop
            say(f"warning: could not remove {path}: {describe_os_error(error)}")
            continue
        removed.append(path)
        say(f"removed {path} (keeping the newest {keep})")
    return removed


def saved_processes(path: str) -> int:
    """How many processes saved a checkpoint (one generator-state file each)."""
    return sum(1 for name in os.listdir(path) if re.fullmatch(r"rng_state_\d+\.safetensors", name))


def load_checkpoint(accelerator: Accelerator, point: ResumePoint, sharded: SavesItself | None = None
                    ) -> TrainingState:
    """Load a verified checkpoint into the prepared objects and this process's generators; returns its state.
    ``sharded`` loads the model and optimizer of an FSDP run (from files any topology writes).

    Accelerate's own micro-batch counter (``accelerator.step``, which decides on which micro-batch gradients are
    synchronised and the optimizer steps) starts again at 0: a checkpoint is always taken at a step boundary, and
    the counter of the saving run (another accumulation, another process count) means nothing to this one.
    """
    accelerator.load_state(point.path)  # model, optimizer, scheduler: safetensors and weights_only loads
    if sharded is not None:
        try:
            sharded.load(point.path)
        except ValueError as error:
            raise CheckpointError(f"cannot resume from {point.path}: {error}") from error
    accelerator.step = 0
    saved_by = saved_processes(point.path)
    if saved_by != accelerator.num_processes:
        accelerator.print(f"note: {point.path} was saved by {saved_by} process(es), this run has "
                          f"{accelerator.num_processes}: the data order and the schedule continue exactly; dropout "
                          "masks differ from those of an uninterrupted run")
    rng_path = os.path.join(point.path, rng_file_name(accelerator.process_index))
    if os.path.isfile(rng_path):
        load_rng_state(rng_path)
    return TrainingState(**point.state.state_dict())
