"""Reading a checkpoint: an exported model folder, or a trainer checkpoint of the same run.

An export (``config.json`` + weights) loads through the package's loader (``backpack.loading``): the installed
classes, and missing / mis-shaped / left-over weights refused by name. A trainer checkpoint (Accelerate's
``save_state`` beside the trainer's ``training_state.json`` and its manifest ``checkpoint.json``) gets its weights
from its ``model.safetensors`` and its configuration from the nearest export of the run; a checkpoint whose
manifest is missing or does not match its files (an interrupted save) is refused.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import ModelCard

from backpack import checkpoints
from backpack.checkpoints import (
    CHECKPOINTS_DIR,
    EXPORT_DIR,
    MANIFEST_FILE,
    RUN_FILE,
    STATE_FILE,
    config_from_training_args,
)
from backpack.loading import (
    WEIGHT_FILES,
    ModelLoadError,
    check_config_sizes,
    check_finite_weights,
    check_memory,
    check_weight_files,
    few,
    is_backpack_config,
    load_pretrained_model,
)
from backpack.loading import load_tokenizer as load_tokenizer_files
from backpack.tokenizer import gpt2_tokenizer
from configuration_backpack_gpt2 import BackpackGPT2Config
from modeling_backpack_gpt2 import BackpackGPT2LMHeadModel

from .errors import CheckpointError

CARD_FILE = "README.md"

# Accelerate's ``save_state`` writes these beside the model weights.
ACCELERATE_MARKERS = ("optimizer.bin", "optimizer.safetensors", "scheduler.bin", "random_states_0.pkl")
LEGACY_STATE_FILE = "custom_checkpoint_0.pkl"  # older trainers: Accelerate's registered-object pickle


@dataclass
class Checkpoint:
    """A model rebuilt from CHECKPOINT plus everything the staging folder and the card need from its run.

    Attributes:
        model: The Backpack, in eval mode, with the checkpoint's weights.
        source: The folder that was given.
        kind: ``"export"`` (a save_pretrained folder) or ``"accelerate"`` (a ``save_state`` folder).
        export_dir: The folder that supplied config / tokenizer / generation config (None: built from the run JSON).
        run: The trainer's JSON: ``{"training_args": {...}, "metrics": {...}}`` ({} when none was found).
        run_file: Where ``run`` came from.
        metrics_are_current: Whether ``run["metrics"]`` describe these weights (False: another step's export).
        step: Optimizer steps of these weights, when known.
        tokens: Training tokens seen by these weights, when known.
        card: An existing model card found with the checkpoint, kept and updated.
    """

    model: BackpackGPT2LMHeadModel
    source: Path
    kind: str
    export_dir: Path | None
    run: dict = field(default_factory=dict)
    run_file: Path | None = None
    metrics_are_current: bool = True
    step: int | None = None
    tokens: int | None = None
    card: ModelCard | None = None

    @property
    def training_args(self) -> dict:
        return self.run.get("training_args", {}) or {}

    @property
    def metrics(self) -> dict:
        return (self.run.get("metrics", {}) or {}) if self.metrics_are_current else {}


def _has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in WEIGHT_FILES)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"can't read {path}: {error}") from error


def _config_candidates(folder: Path) -> list[Path]:
    """Where an Accelerate checkpoint's configuration may be, nearest first.

    The trainer keeps ``<output_dir>/checkpoints/checkpoint_<i>/`` with its own export in ``model/`` and the run's
    final export in ``<output_dir>/model``.
    """
    output_dir = folder.parent.parent if folder.parent.name == CHECKPOINTS_DIR else folder.parent
    return [folder, folder / EXPORT_DIR, output_dir / EXPORT_DIR, output_dir, folder.parent]


def _config_from_run(args: dict) -> BackpackGPT2Config:
    """The configuration a run trained, from its recorded arguments (a checkpoint without its exported config)."""
    try:
        return config_from_training_args(args)
    except checkpoints.CheckpointError as error:
        raise CheckpointError(str(error)) from error


def _refused(check, *args) -> None:
    """Run one of the loader's checks of a broken checkpoint; its ModelLoadError becomes a CheckpointError."""
    try:
        check(*args)
    except ModelLoadError as error:
        raise CheckpointError(str(error)) from error


def _raw_weights_file(folder: Path) -> Path | None:
    return next((folder / name for name in ("model.safetensors", "pytorch_model.bin") if (folder / name).is_file()),
                None)


def _load_raw_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The state dict an Accelerate checkpoint stores for its first model (safetensors or a pickled .bin).

    The file is checked as the loader checks an export's (readable, floating-point tensors) before it is read.
    """
    path = _raw_weights_file(folder)
    if path is not None:
        _refused(check_weight_files, [path])
    if path is not None and path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    elif path is not None:
        state = torch.load(path, map_location="cpu", weights_only=True)
    elif any(folder.glob("pytorch_model_fsdp_*")):
        raise CheckpointError(
            f"{folder} holds a sharded FSDP state (pytorch_model_fsdp_*): merge it first with "
            f"`accelerate merge-weights {next(folder.glob('pytorch_model_fsdp_*'))} {folder}`, or publish the run's "
            "exported folder (checkpoint_<i>/model or <output_dir>/model) instead"
        )
    else:
        raise CheckpointError(f"{folder} has no model.safetensors or pytorch_model.bin")
    # DDP / torch.compile wrappers prefix the names when a state dict is taken from the wrapped model.
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", key): value for key, value in state.items()}


def _load_into(model: BackpackGPT2LMHeadModel, state: dict[str, torch.Tensor], where: Path) -> None:
    """Load ``state`` strictly, except for names that alias a tensor that *is* loaded (tied weights)."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes that differ from the configuration's
        raise CheckpointError(f"the weights in {where} do not fit the configuration: {error}") from error
    own = model.state_dict()
    loaded_pointers = {own[key].data_ptr() for key in state if key in own}
    missing = [key for key in result.missing_keys if own[key].data_ptr() not in loaded_pointers]
    unexpected = [key for key in result.unexpected_keys if not re.search(r"attn\.(masked_)?bias$", key)]
    if missing or unexpected:
        raise CheckpointError(f"the weights in {where} do not fit the configuration: missing {few(missing)}, "
                              f"unexpected {few(unexpected)}")


def _read_training_state(folder: Path) -> dict:
    """The trainer's position in the run (step, micro_batches, tokens, sequences_per_step), {} when not recorded.

    ``training_state.json`` in the checkpoint folder; checkpoints of older trainers have it in Accelerate's
    ``custom_checkpoint_0.pkl`` instead, read with ``weights_only=True`` (plain data only, no code).
    """
    if (folder / STATE_FILE).is_file():
        try:
            return checkpoints.read_training_state(folder).state_dict()
        except checkpoints.CheckpointError as error:
            raise CheckpointError(str(error)) from error
    path = folder / LEGACY_STATE_FILE
    if not path.is_file() or (folder / MANIFEST_FILE).is_file():  # a new-format checkpoint never has one to trust
        return {}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # another registered object, or an older format: the card then says "not recorded"
        return {}
    return state if isinstance(state, dict) else {}


def _is_new_format_checkpoint(folder: Path) -> bool:
    """A checkpoint folder of the current trainer: its position is in training_state.json, not in a pickle.

    Also true for a ``checkpoints/checkpoint_<i>`` folder with Accelerate's files but neither record: a save that
    stopped before the trainer wrote its own files (older trainers always wrote custom_checkpoint_0.pkl).
    """
    if (folder / STATE_FILE).is_file() or (folder / MANIFEST_FILE).is_file():
        return True
    accelerate = any((folder / name).is_file() for name in ACCELERATE_MARKERS)
    return (accelerate and checkpoints.is_checkpoint_folder(folder)
            and not (folder / LEGACY_STATE_FILE).is_file())


def _check_complete(folder: Path) -> None:
    """Refuse an interrupted or damaged save of the trainer: a new-format checkpoint must have its manifest.

    The manifest ``checkpoint.json`` (``{"format", "step", "files": {path: {"bytes", "sha256"}}}``) is written
    last; every file it lists must be there with its size and SHA-256.
    """
    if not _is_new_format_checkpoint(folder):
        return
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{folder} is an incomplete trainer checkpoint: it has no {MANIFEST_FILE}, which the trainer writes "
            "last, so the save was interrupted and its files may be partial. Publish an earlier checkpoint or the "
            "run's final export (<output_dir>/model) instead"
        )
    try:
        checkpoints.check_listed_files(folder, checkpoints.read_manifest(folder))
    except checkpoints.FileMismatch as error:
        raise CheckpointError(f"{folder}: {error.relative} does not match its size / SHA-256 in {MANIFEST_FILE} "
                              "(missing, truncated, corrupted or replaced)") from error
    except checkpoints.CheckpointError as error:
        raise CheckpointError(str(error)) from error


def _find_card(*folders: Path | None) -> ModelCard | None:
    for folder in folders:
        if folder is not None and (folder / CARD_FILE).is_file():
            return ModelCard.load(folder / CARD_FILE)
    return None


def load_checkpoint(folder: str | os.PathLike) -> Checkpoint:
    """Rebuild the Backpack of CHECKPOINT: an exported folder, or an Accelerate checkpoint of the same run.

    Raises:
        CheckpointError: naming what is missing (weights, configuration) or why the folder is not usable.
    """
    source = Path(folder).expanduser().resolve()
    if not source.is_dir():
        raise CheckpointError(f"{source} is not a folder")
    _check_complete(source)
    if source.name == "model":  # a checkpoint's export: the checkpoint around it must be complete too
        _check_complete(source.parent)

    if (source / "config.json").is_file() and _has_weights(source):
        config = read_json(source / "config.json")
        if not is_backpack_config(config):
            raise CheckpointError(f"{source}/config.json is not a Backpack GPT-2 configuration "
                                  f"(architectures: {config.get('architectures')}); this tool publishes Backpacks")
        # The package's loader: the installed classes, and missing / mis-shaped / left-over weights refused by name
        # (from_pretrained initialises missing weights at random and only warns: never publish such a model).
        try:
            model = load_pretrained_model(source, config=config, require_backpack=True)
        except ModelLoadError as error:
            raise CheckpointError(str(error)) from error
        run_file = source / RUN_FILE
        run = read_json(run_file) if run_file.is_file() else {}
        metrics = run.get("metrics", {}) or {}
        return Checkpoint(model=model, source=source, kind="export", export_dir=source, run=run,
                          run_file=run_file if run else None, step=metrics.get("step"), tokens=metrics.get("tokens"),
                          card=_find_card(source))

    is_accelerate = any((source / name).is_file() for name in ACCELERATE_MARKERS) or any(
        source.glob("pytorch_model_fsdp_*"))
    if not is_accelerate:
        hint = f"; the run's export is {source / 'model'}" if _has_weights(source / "model") else ""
        raise CheckpointError(
            f"{source} is neither an exported model folder (config.json + model.safetensors) nor an Accelerate "
            f"checkpoint (model.safetensors + optimizer.bin){hint}"
        )
    return _load_accelerate_checkpoint(source)


def _load_accelerate_checkpoint(source: Path) -> Checkpoint:
    """An Accelerate ``save_state`` folder: weights from it, configuration from the nearest export or run JSON."""
    state = _load_raw_state_dict(source)
    candidates = _config_candidates(source)
    export_dir = next((c for c in candidates if (c / "config.json").is_file()), None)
    run_dir = next((c for c in candidates if (c / RUN_FILE).is_file()), None)
    run = read_json(run_dir / RUN_FILE) if run_dir else {}
    if export_dir is not None:
        config_dict = read_json(export_dir / "config.json")
        if not is_backpack_config(config_dict):
            raise CheckpointError(f"{export_dir}/config.json is not a Backpack GPT-2 configuration")
        _refused(check_config_sizes, config_dict, str(export_dir / "config.json"))
        config = BackpackGPT2Config.from_pretrained(export_dir)
    elif run:
        config = _config_from_run(run.get("training_args", {}) or {})
    else:
        searched = ", ".join(str(c) for c in dict.fromkeys(candidates))
        raise CheckpointError(f"{source} is an Accelerate checkpoint but no config.json or {RUN_FILE} was found "
                              f"to rebuild the model from (searched: {searched})")

    _refused(check_memory, config.to_dict(), f"the configuration of {source}")  # before the model is allocated
    model = BackpackGPT2LMHeadModel(config)
    _load_into(model, state, source)
    _refused(check_finite_weights, model, [_raw_weights_file(source)], str(source))
    model.eval()
    if export_dir is not None and (export_dir / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(export_dir)
    else:  # what the trainer sets (train/model.py): the pipeline's default length would run past the positions
        model.generation_config.pad_token_id = config.eos_token_id
        model.generation_config.max_length = config.n_positions

    training_state = _read_training_state(source)
    metrics = run.get("metrics", {}) or {}
    # The run JSON describes these weights only if it was exported with them (checkpoint_<i>/model) at that step.
    current = run_dir in (source, source / "model") and (
        not training_state or metrics.get("step") in (None, training_state.get("step")))
    return Checkpoint(
        model=model, source=source, kind="accelerate", export_dir=export_dir, run=run,
        run_file=run_dir / RUN_FILE if run_dir else None, metrics_are_current=current,
        step=training_state.get("step", metrics.get("step") if current else None),
        tokens=training_state.get("tokens", metrics.get("tokens") if current else None),
        card=_find_card(source, source / "model"),
    )


def load_tokenizer(checkpoint: Checkpoint):
    """The tokenizer of the checkpoint's export if it has one, else the exact GPT-2 tokenizer built offline.

    Through the package's loader: the export's own files without running any of its code.
    """
    config = checkpoint.model.config
    if checkpoint.export_dir is not None:
        try:
            tokenizer = load_tokenizer_files(checkpoint.export_dir, model_max_length=config.n_positions, config=config)
        except ModelLoadError as error:
            raise CheckpointError(str(error)) from error
    else:
        tokenizer = gpt2_tokenizer(model_max_length=config.n_positions)
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(f"the tokenizer has {len(tokenizer)} tokens but the model only "
                              f"{config.vocab_size} embeddings")
    return tokenizer
