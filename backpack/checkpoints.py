"""The trainer's checkpoint format, read by the trainer (to resume) and by the Hub tool (to publish).

A run's ``<output_dir>`` holds ``checkpoints/checkpoint_<i>/`` folders (``i`` counts saves: 0, 1, 2 ...) and its
final export ``model/``. A checkpoint folder holds

* Accelerate's ``save_state`` files (``model.safetensors``, ``optimizer.bin``, ``scheduler.bin`` ...) and one
  ``rng_state_<process>.safetensors`` per process;
* ``training_state.json``: the run's position, ``{"step", "sequences", "tokens", "sequences_per_step"}``;
* ``model/``: the exported Hugging Face folder of these weights, with ``config.json`` and ``training_args.json``
  (``{"training_args": {...}, "metrics": {...}}``);
* ``checkpoint.json``, the manifest, written last: ``{"format": 1, "step": ..., "files": {path: {"bytes": ...,
  "sha256": ...}}}``. A checkpoint is complete when its manifest exists and every file matches it.

This module reads that format (the writer is ``backpack_train.checkpointing``); every problem is a
:class:`CheckpointError` naming the folder and what is wrong.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, fields

from configuration_backpack_gpt2 import GPT2_END_OF_TEXT, BackpackGPT2Config

from .files import file_sha256
from .loading import few

CHECKPOINTS_DIR = "checkpoints"
MANIFEST_FILE = "checkpoint.json"
STATE_FILE = "training_state.json"
EXPORT_DIR = "model"
RUN_FILE = "training_args.json"  # in an export: {"training_args": {...}, "metrics": {...}}
FORMAT = 1
CHECKPOINT_NAME = re.compile(r"checkpoint_(\d+)")


class CheckpointError(Exception):
    """A checkpoint is incomplete, corrupt or not this trainer's, or a save failed; the message says which."""


class FileMismatch(CheckpointError):
    """A file a manifest lists is missing or differs from its size / SHA-256 there (``relative`` names it)."""

    def __init__(self, message: str, relative: str):
        super().__init__(message)
        self.relative = relative


@dataclass
class TrainingState:
    """Where the run is, in global units: optimizer steps done, sequences of the data order read (all processes
    together), tokens seen, and the global batch (sequences per step) of the last step."""

    step: int = 0
    sequences: int = 0
    tokens: int = 0
    sequences_per_step: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, where: str) -> TrainingState:
        """Read the JSON of ``training_state.json``, checking that every key is a non-negative integer.

        Files of earlier trainers count ``micro_batches`` of one process instead of ``sequences``; their position
        is ``step x sequences_per_step`` (every step of such a run had that size).
        """
        if isinstance(values, dict) and "sequences" not in values and "micro_batches" in values:
            step, per_step = values.get("step"), values.get("sequences_per_step")
            if isinstance(step, int) and isinstance(per_step, int):
                values = {**values, "sequences": step * per_step}
        names = [field.name for field in fields(cls)]
        if not isinstance(values, dict) or any(
                not isinstance(values.get(name), int) or isinstance(values.get(name), bool) or values[name] < 0
                for name in names):
            raise CheckpointError(f"{where} must hold non-negative integers {', '.join(names)}; found {values!r}")
        return cls(**{name: values[name] for name in names})


# --- the folders of a run ------------------------------------------------------------------------------------------


def checkpoints_root(output_dir: str | os.PathLike) -> str:
    return os.path.join(output_dir, CHECKPOINTS_DIR)


def checkpoint_index(path: str | os.PathLike) -> int | None:
    """The ``i`` of a ``checkpoint_<i>`` folder (None for any other name)."""
    match = CHECKPOINT_NAME.fullmatch(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def is_checkpoint_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is named as the trainer names a checkpoint: ``.../checkpoints/checkpoint_<i>``."""
    parent = os.path.basename(os.path.dirname(os.path.normpath(path)))
    return parent == CHECKPOINTS_DIR and checkpoint_index(path) is not None


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[str]:
    """The run's ``checkpoint_<i>`` folders, complete or not, oldest (lowest ``i``) first; other names ignored."""
    root = checkpoints_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = [(index, os.path.join(root, name)) for name in os.listdir(root)
             if (index := checkpoint_index(name)) is not None]
    return [path for _, path in sorted(found) if os.path.isdir(path)]


def relative_files(folder: str | os.PathLike) -> set[str]:
    """Every file under ``folder``, as ``/``-separated paths relative to it."""
    files = set()
    for parent, _, names in os.walk(folder):
        for name in names:
            files.add(os.path.relpath(os.path.join(parent, name), folder).replace(os.sep, "/"))
    return files


# --- reading and verifying -----------------------------------------------------------------------------------------


def _read_json(path: str, folder: str | os.PathLike, name: str) -> object:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{folder}: unreadable {name} ({error})") from error


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a checkpoint folder, checked for shape only (no file is read)."""
    manifest_path = os.path.join(path, MANIFEST_FILE)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"{path} is incomplete: it has no {MANIFEST_FILE}, which a save writes last")
    manifest = _read_json(manifest_path, path, MANIFEST_FILE)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(files, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("step"), int)
            or not all(isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
                       and isinstance(entry.get("sha256"), str) for entry in files.values())):
        raise CheckpointError(f"{path}: {MANIFEST_FILE} is not a format-{FORMAT} checkpoint manifest")
    for relative in files:
        parts = relative.split("/")
        if relative.startswith("/") or ".." in parts or "" in parts:
            raise CheckpointError(f"{path}: {MANIFEST_FILE} lists a path outside the checkpoint: {relative!r}")
    return manifest


def check_listed_files(path: str | os.PathLike, manifest: dict) -> None:
    """Check that every file the manifest lists is there with its size, then with its SHA-256.

    Raises:
        FileMismatch: naming the first file that is missing, truncated or replaced (sizes), or corrupted.
    """
    files = manifest["files"]
    for relative, entry in files.items():  # sizes first: cheap, and they catch truncation
        full = os.path.join(path, relative)
        if not os.path.isfile(full):
            raise FileMismatch(f"{path}: {relative} is missing", relative)
        size = os.path.getsize(full)
        if size != entry["bytes"]:
            raise FileMismatch(f"{path}: {relative} has {size:,} bytes, {MANIFEST_FILE} says {entry['bytes']:,} "
                               "(truncated or replaced)", relative)
    for relative, entry in files.items():
        if file_sha256(os.path.join(path, relative)) != entry["sha256"]:
            raise FileMismatch(f"{path}: {relative} does not match its SHA-256 in {MANIFEST_FILE} (corrupted)",
                               relative)


def read_training_state(path: str | os.PathLike) -> TrainingState:
    """The run's position stored in a checkpoint (``training_state.json``)."""
    state_path = os.path.join(path, STATE_FILE)
    return TrainingState.from_dict(_read_json(state_path, path, STATE_FILE), state_path)


def verify_checkpoint(path: str | os.PathLike) -> TrainingState:
    """Check that a checkpoint is complete and intact; returns its training state.

    Complete: the manifest exists and lists the training state and the export. Intact: every listed file has its
    size and SHA-256, and no other file is there (a file added later is not what the save wrote, and loading it
    may run code: Accelerate unpickles ``custom_checkpoint_*.pkl``).

    Raises:
        CheckpointError: naming the checkpoint and the first problem found.
    """
    manifest = read_manifest(path)
    files = manifest["files"]
    for required in (STATE_FILE, f"{EXPORT_DIR}/config.json"):
        if required not in files:
            raise CheckpointError(f"{path}: {MANIFEST_FILE} does not list {required}")
    unlisted = sorted(relative_files(path) - set(files) - {MANIFEST_FILE})
    if unlisted:
        pickles = [name for name in unlisted if name.endswith(".pkl")]
        why = (f"refusing it: Accelerate would unpickle {pickles[0]}, which can run any code" if pickles
               else "refusing it: a checkpoint holds exactly what its save wrote")
        raise CheckpointError(f"{path} holds files its {MANIFEST_FILE} does not list: {few(unlisted, 4)}; {why}")
    check_listed_files(path, manifest)
    state = read_training_state(path)
    if state.step != manifest["step"]:
        raise CheckpointError(f"{path}: {STATE_FILE} says step {state.step}, {MANIFEST_FILE} step {manifest['step']}")
    return state


def newest_complete(output_dir: str | os.PathLike) -> tuple[str, int] | None:
    """The newest checkpoint with a manifest and its step (no file is hashed: for messages, not for resuming)."""
    for path in reversed(checkpoint_dirs(output_dir)):
        try:
            return path, read_manifest(path)["step"]
        except CheckpointError:
            continue
    return None


# --- the run's settings --------------------------------------------------------------------------------------------


def checkpoint_settings(path: str | os.PathLike) -> dict:
    """The settings of the run that saved a checkpoint (``training_args`` of its export); {} when not recorded."""
    try:
        with open(os.path.join(path, EXPORT_DIR, RUN_FILE), encoding="utf-8") as handle:
            settings = json.load(handle).get("training_args")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return {}
    return settings if isinstance(settings, dict) else {}


def config_from_training_args(args: dict) -> BackpackGPT2Config:
    """The Backpack configuration a run trained, from the ``training_args`` it recorded.

    For a checkpoint without its exported ``config.json``: the named size of the registry (the shape keys the run
    set on top), or, for runs older than the registry, the shape key by key; then the senses, the vocabulary,
    dropout and GPT-2's ``<|endoftext|>`` as start and end of text, as the trainer builds it. Keys a run did not
    record take the configuration's defaults.

    Raises:
        CheckpointError: the run trained a plain GPT-2, or recorded neither a size nor its shape.
    """
    if args.get("model", "backpack") != "backpack":
        raise CheckpointError(f"the run trained model={args.get('model')!r}, not a Backpack; this tool publishes "
                              "Backpack GPT-2 models")
    shape_keys = ("n_embd", "n_layer", "n_head", "n_positions")
    if "size" not in args:  # runs before the size registry recorded their shape key by key
        missing = [key for key in shape_keys[:3] if key not in args]
        if missing:
            raise CheckpointError(f"the run's {RUN_FILE} lacks the model shape ({', '.join(missing)})")
    settings = {key: args[key] for key in (*shape_keys, "vocab_size", "num_senses", "sense_intermediate_scale")
                if args.get(key) is not None}
    if args.get("dropout") is not None:
        settings.update(resid_pdrop=args["dropout"], embd_pdrop=args["dropout"], attn_pdrop=args["dropout"])
    settings.update(bos_token_id=GPT2_END_OF_TEXT, eos_token_id=GPT2_END_OF_TEXT)
    try:
        if "size" in args:
            return BackpackGPT2Config.from_size(args["size"], **settings)
        return BackpackGPT2Config(**settings)
    except ValueError as error:
        raise CheckpointError(f"the run's {RUN_FILE} does not describe a Backpack: {error}") from error
