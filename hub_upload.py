"""Publish a Backpack GPT-2 checkpoint and its model card to the Hugging Face Hub, in one commit.

    python hub_upload.py outputs/nano/model --repo-id me/backpack-nano --dry-run
    python hub_upload.py outputs/nano/model --repo-id me/backpack-nano --private
    python hub_upload.py outputs/nano/checkpoints/checkpoint_2 --repo-id me/backpack-nano --revision step-2000
    python hub_upload.py --update-code stanfordnlp/backpack-gpt2 [--dry-run]

CHECKPOINT is a folder that the trainer exported (``config.json`` + weights, as ``train/export.py`` writes it), or
an Accelerate checkpoint (``accelerator.save_state``: ``model.safetensors`` of the raw state dict beside the
optimizer, scheduler and RNG files), whose configuration is taken from the nearest export of the same run.

The tool builds a *staging folder* that is exactly what the Hub repo will hold: the weights (``model.safetensors``,
sharded with an index above ``--max-shard-size``), ``config.json`` (``auto_map`` + ``architectures``), the two
model code files of the installed package, ``generation_config.json``, the tokenizer files and ``README.md`` (a
model card with the run's training details and results). It then loads the staging folder in a fresh Python
process through ``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)``, checks that its logits on
a fixed input equal the checkpoint's and runs the text-generation pipeline for a few tokens. Only then does it push,
with ``HfApi``, everything in ONE commit: a failure never leaves a half-updated repo.

``--update-code OWNER/NAME`` proposes this package's model code to an existing Backpack repo instead: it downloads
the repo's snapshot, swaps in the two installed code files (and ``auto_map`` in ``config.json`` if needed; the
weights are untouched), checks in a fresh process with ``trust_remote_code=True`` that the weights load and give the
same logits as the installed classes, then opens ONE pull request and prints its URL and the ``revision="refs/pr/N"``
that loads it until it is merged.

From Python (``train/pretrain.py --push_to_hub`` calls this, on the main process only)::

    from hub_upload import push_checkpoint
    url = push_checkpoint("outputs/nano/model", "me/backpack-nano", private=True)

Exit codes:
    0  pushed or pull request opened (with --dry-run: staged and validated, nothing pushed)
    1  unexpected error (with its traceback)
    2  bad command line (argparse errors; a repo id that is not OWNER/NAME)
    3  the checkpoint can't be read: weights or configuration missing, not a Backpack, unsupported layout,
       an incomplete trainer checkpoint (no checkpoint.json)
    4  validation of the staging folder failed: nothing was pushed
    5  no Hugging Face token, or the Hub rejected it (401)
    6  the token may not write to the repo (403, a read-only token, another user's namespace)
    7  the repo does not match: it is a dataset or Space, or it is public while --private was asked
    8  the Hub could not be reached (network failure, timeout, server error, HF_HUB_OFFLINE=1)
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
    get_token,
)
from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors

import configuration_backpack_gpt2
import modeling_backpack_gpt2
from backpack.loading import ModelLoadError, is_backpack_config, load_model, load_pretrained_model
from configuration_backpack_gpt2 import BackpackGPT2Config
from modeling_backpack_gpt2 import BackpackGPT2LMHeadModel

# --- constants ---------------------------------------------------------------------------------------------

RUN_FILE = "training_args.json"  # written by train/export.py: {"training_args": {...}, "metrics": {...}}
CARD_FILE = "README.md"
CODE_MODULES = (configuration_backpack_gpt2, modeling_backpack_gpt2)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_MARKERS = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
# What config.json needs for AutoModelForCausalLM(..., trust_remote_code=True) to find the code files.
AUTO_MAP = {"AutoConfig": "configuration_backpack_gpt2.BackpackGPT2Config",
            "AutoModelForCausalLM": "modeling_backpack_gpt2.BackpackGPT2LMHeadModel"}
# Remote weight files that a new push replaces: a stale shard or index next to new weights would break loading.
STALE_WEIGHT_PATTERN = re.compile(r"(^|/)(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")
# Accelerate's ``save_state`` writes these beside the model weights.
ACCELERATE_MARKERS = ("optimizer.bin", "optimizer.safetensors", "scheduler.bin", "random_states_0.pkl")
# The trainer's own files in a checkpoint folder: the run's position (step, micro_batches, tokens,
# sequences_per_step), and the manifest it writes last, once everything else is on disk.
TRAINING_STATE_FILE = "training_state.json"
MANIFEST_FILE = "checkpoint.json"
LEGACY_TRAINING_STATE_FILE = "custom_checkpoint_0.pkl"  # older trainers: Accelerate's registered-object pickle
VALIDATION_PROMPT = "The Backpack language model predicts the next word from"
VALIDATION_NEW_TOKENS = 5
GPT2_EOS = 50256
DEFAULT_LICENSE = "apache-2.0"
CARD_TAGS = ["backpack", "gpt2", "sense-vectors", "interpretability", "custom_code", "text-generation"]
EMBEDDED_CORPUS = "the package's embedded offline corpus (gensim's Wikipedia sample + the Lee news corpus)"

CITATION = """\
@inproceedings{hewitt-etal-2023-backpack,
    title = "Backpack Language Models",
    author = "Hewitt, John and Thickstun, John and Manning, Christopher D. and Liang, Percy",
    booktitle = "Proceedings of the 61st Annual Meeting of the Association for Computational Linguistics
                 (Volume 1: Long Papers)",
    year = "2023",
    publisher = "Association for Computational Linguistics",
    url = "https://aclanthology.org/2023.acl-long.506",
    pages = "9103--9125",
}"""


# --- errors (each one an exit code and a message that says what to do) ---------------------------------------


class HubUploadError(Exception):
    """A failure the command reports with a clear message and a documented exit code."""

    exit_code = 1


class UsageError(HubUploadError):
    """A bad argument: a repo id that is not OWNER/NAME, a staging folder that is not empty."""

    exit_code = 2


class CheckpointError(HubUploadError):
    """The checkpoint folder can't be turned into a model."""

    exit_code = 3


class ValidationFailed(HubUploadError):
    """The staging folder does not load, does not match the checkpoint, or does not generate."""

    exit_code = 4


class AuthenticationError(HubUploadError):
    """No token, or an invalid one (HTTP 401)."""

    exit_code = 5


class PermissionDenied(HubUploadError):
    """The token can't write to the repo (HTTP 403, read-only token, foreign namespace)."""

    exit_code = 6


class RepoMismatch(HubUploadError):
    """The repo is of another type, or public while a private one was asked for."""

    exit_code = 7


class HubUnreachable(HubUploadError):
    """Network failure, timeout, server error or offline mode."""

    exit_code = 8


# --- reading the checkpoint ----------------------------------------------------------------------------------


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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"can't read {path}: {error}") from error


def _config_candidates(folder: Path) -> list[Path]:
    """Where an Accelerate checkpoint's configuration may be, nearest first.

    The trainer keeps ``<output_dir>/checkpoints/checkpoint_<i>/`` with its own export in ``model/`` and the run's
    final export in ``<output_dir>/model``.
    """
    output_dir = folder.parent.parent if folder.parent.name == "checkpoints" else folder.parent
    return [folder, folder / "model", output_dir / "model", output_dir, folder.parent]


def config_from_training_args(args: dict) -> BackpackGPT2Config:
    """The configuration the trainer builds from its arguments (mirrors ``train/model.py:model_config``)."""
    if args.get("model", "backpack") != "backpack":
        raise CheckpointError(f"the run trained model={args.get('model')!r}, not a Backpack; this tool publishes "
                              "Backpack GPT-2 models")
    missing = [key for key in ("n_embd", "n_layer", "n_head") if key not in args]
    if missing:
        raise CheckpointError(f"the run's {RUN_FILE} lacks the model shape ({', '.join(missing)})")
    dropout = args.get("dropout", 0.1)
    return BackpackGPT2Config(
        vocab_size=args.get("vocab_size", 50264), n_positions=args.get("n_positions", 512), n_embd=args["n_embd"],
        n_layer=args["n_layer"], n_head=args["n_head"], num_senses=args.get("num_senses", 16),
        sense_intermediate_scale=args.get("sense_intermediate_scale", 4), resid_pdrop=dropout, embd_pdrop=dropout,
        attn_pdrop=dropout, bos_token_id=GPT2_EOS, eos_token_id=GPT2_EOS, pad_token_id=GPT2_EOS,
    )


def _load_raw_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The state dict an Accelerate checkpoint stores for its first model (safetensors or a pickled .bin)."""
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").is_file():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
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
        raise CheckpointError(f"the weights in {where} do not fit the configuration: missing {_few(missing)}, "
                              f"unexpected {_few(unexpected)}")


def _few(names: list[str], count: int = 5) -> str:
    return ", ".join(names[:count]) + (f" and {len(names) - count} more" if len(names) > count else "") or "none"


def _read_training_state(folder: Path) -> dict:
    """The trainer's position in the run (step, micro_batches, tokens, sequences_per_step), {} when not recorded.

    ``training_state.json`` in the checkpoint folder; checkpoints of older trainers have it in Accelerate's
    ``custom_checkpoint_0.pkl`` instead, read with ``weights_only=True`` (plain data only, no code).
    """
    path = folder / TRAINING_STATE_FILE
    if path.is_file():
        state = _read_json(path)
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} is not a JSON object with the run's step and tokens")
        return state
    path = folder / LEGACY_TRAINING_STATE_FILE
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
    if (folder / TRAINING_STATE_FILE).is_file() or (folder / MANIFEST_FILE).is_file():
        return True
    accelerate = any((folder / name).is_file() for name in ACCELERATE_MARKERS)
    return (accelerate and folder.parent.name == "checkpoints" and re.fullmatch(r"checkpoint_\d+", folder.name)
            is not None and not (folder / LEGACY_TRAINING_STATE_FILE).is_file())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    manifest = _read_json(manifest_path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(entry, dict) for entry in files.values()):
        raise CheckpointError(f"{manifest_path} is not a checkpoint manifest (no \"files\" table)")
    for relative, entry in sorted(files.items()):
        path = folder / relative
        if ".." in Path(relative).parts or not path.is_file():
            raise CheckpointError(f"{folder} is incomplete: {relative}, listed in its {MANIFEST_FILE}, is missing")
        if path.stat().st_size != entry.get("bytes") or _sha256(path) != entry.get("sha256"):
            raise CheckpointError(f"{folder}: {relative} does not match its size / SHA-256 in {MANIFEST_FILE} "
                                  "(truncated, corrupted or replaced)")


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
        config = _read_json(source / "config.json")
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
        run = _read_json(run_file) if run_file.is_file() else {}
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
    run = _read_json(run_dir / RUN_FILE) if run_dir else {}
    if export_dir is not None:
        config_dict = _read_json(export_dir / "config.json")
        if not is_backpack_config(config_dict):
            raise CheckpointError(f"{export_dir}/config.json is not a Backpack GPT-2 configuration")
        config = BackpackGPT2Config.from_pretrained(export_dir)
    elif run:
        config = config_from_training_args(run.get("training_args", {}) or {})
    else:
        searched = ", ".join(str(c) for c in dict.fromkeys(candidates))
        raise CheckpointError(f"{source} is an Accelerate checkpoint but no config.json or {RUN_FILE} was found "
                              f"to rebuild the model from (searched: {searched})")

    model = BackpackGPT2LMHeadModel(config)
    _load_into(model, state, source)
    model.eval()
    if export_dir is not None and (export_dir / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(export_dir)
    else:  # what the trainer sets (train/model.py): the pipeline's default length would run past the positions
        model.generation_config.pad_token_id = config.pad_token_id
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
    """The checkpoint's tokenizer files if it has them, else the exact GPT-2 tokenizer built offline."""
    folder = checkpoint.export_dir
    if folder is not None and any((folder / name).is_file() for name in TOKENIZER_MARKERS):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        from backpack.tokenizer import gpt2_tokenizer

        tokenizer = gpt2_tokenizer(model_max_length=checkpoint.model.config.n_positions)
    if len(tokenizer) > checkpoint.model.config.vocab_size:
        raise CheckpointError(f"the tokenizer has {len(tokenizer)} tokens but the model only "
                              f"{checkpoint.model.config.vocab_size} embeddings")
    return tokenizer


# --- the model card ------------------------------------------------------------------------------------------


def _fmt_int(value) -> str:
    return f"{int(value):,}" if isinstance(value, (int, float)) else "not recorded"


def _fmt_duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "not recorded"
    hours, rest = divmod(int(round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _hub_dataset_id(name: str | None) -> str | None:
    """``name`` if it looks like a Hub dataset id (``openwebtext``, ``owner/name``), not a local path."""
    if not name or os.path.exists(os.path.expanduser(name)):
        return None
    return name if re.fullmatch(r"[\w-][\w.-]*(/[\w.-]+)?", name) else None


def describe_data(args: dict) -> tuple[str, str, str | None]:
    """(prose, short name, Hub dataset id or None) for the run's training data."""
    dataset, files = args.get("dataset"), args.get("data_files")
    if dataset:
        hub_id = _hub_dataset_id(dataset)
        config = f" ({args['dataset_config']})" if args.get("dataset_config") else ""
        shown = f"[{dataset}](https://huggingface.co/datasets/{dataset})" if hub_id else f"`{Path(dataset).name}`"
        return f"{shown}{config}", (hub_id or Path(dataset).name), hub_id
    if files:
        names = ", ".join(f"`{Path(f).name}`" for f in files[:5]) + (" ..." if len(files) > 5 else "")
        return f"local text files ({names})", "local text files", None
    if args:
        return EMBEDDED_CORPUS, "embedded offline corpus", None
    return "not recorded", "training data", None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def measured_validation(metrics: dict, prefix: str = "") -> tuple[float | None, float] | None:
    """``(loss, perplexity)`` of a validation that really measured something, else None.

    A validation over zero tokens (an empty split, or one shorter than a block) averages nothing: loss 0 and
    perplexity exp(0) = 1.0, a perfect score that was never measured. The run's token count
    (``<prefix>val_tokens``) says so when recorded; without it, that exact signature is taken for one.

    Args:
        prefix: ``""`` for the final validation, ``"start_"`` for the one before training.
    """
    loss, perplexity = metrics.get(f"{prefix}val_loss"), metrics.get(f"{prefix}val_perplexity")
    tokens = metrics.get(f"{prefix}val_tokens")
    if not _is_number(perplexity):
        return None
    if tokens is not None and not (_is_number(tokens) and tokens > 0):
        return None
    if tokens is None and perplexity == 1.0 and loss in (None, 0):
        return None
    return (float(loss) if _is_number(loss) else None), float(perplexity)


def _zero_token_validation(metrics: dict, prefix: str = "") -> bool:
    """Whether the run recorded a validation result that measured no tokens (see `measured_validation`)."""
    return f"{prefix}val_perplexity" in metrics and measured_validation(metrics, prefix) is None


def eval_results(checkpoint: Checkpoint, data_name: str, data_id: str | None) -> list[EvalResult]:
    """The run's measured validation results as model-index entries (none when nothing was measured)."""
    measured = measured_validation(checkpoint.metrics)
    if measured is None:
        return []
    loss, perplexity = measured
    common = dict(task_type="text-generation", task_name="Language modeling", dataset_type=data_id or "local",
                  dataset_name=data_name, dataset_split="validation")
    results = [EvalResult(metric_type="perplexity", metric_name="Validation perplexity",
                          metric_value=round(perplexity, 4), **common)]
    if loss is not None:
        results.append(EvalResult(metric_type="loss", metric_name="Validation loss (nats/token)",
                                  metric_value=round(loss, 4), **common))
    return results


def _count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once, as the paper counts them)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _usage_section(repo_id: str, revision: str | None) -> str:
    rev = f', revision="{revision}"' if revision and revision != "main" else ""
    return f"""\
## How to use

The model code travels with the weights (`configuration_backpack_gpt2.py`, `modeling_backpack_gpt2.py`), so
loading needs `trust_remote_code=True`:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo_id}"{rev}, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{repo_id}"{rev})
```

### Generate

```python
from transformers import pipeline

generator = pipeline("text-generation", model="{repo_id}"{rev}, trust_remote_code=True)
print(generator("The river bank", max_new_tokens=30, do_sample=True, top_p=0.9)[0]["generated_text"])
```

### Read the senses of a word

Each word has `k` sense vectors; sense `l` of word `x` pushes every prediction along `E·C(x)[l]`, so its top
words describe it:

```python
ids = tokenizer(" bank").input_ids                         # a word = its first (here only) subword
top = model.sense_logits(ids)[0].topk(5, dim=-1).indices   # (senses, 5): each sense's top words
for sense, words in enumerate(top):
    print(sense, tokenizer.convert_ids_to_tokens(words))
```

`model(..., output_contextualization=True, output_senses=True)` also returns the weights `α` and the senses
`C(x)`, and `model.set_sense_edit(token_id, senses)` replaces a word's senses in every context.
"""


def _training_section(checkpoint: Checkpoint, data_prose: str) -> str:
    args, metrics = checkpoint.training_args, checkpoint.metrics
    if not args and not metrics and checkpoint.step is None:
        return "## Training details\n\nThe checkpoint carries no record of its training run.\n"
    rows: list[tuple[str, str]] = [("Data", data_prose)]
    max_steps = args.get("max_steps")
    step_text = _fmt_int(checkpoint.step)
    if checkpoint.step is not None and max_steps:
        step_text += f" of {int(max_steps):,} scheduled"
    if metrics.get("stopped_by"):
        step_text += f" (stopped early by {metrics['stopped_by']})"
    rows.append(("Optimizer steps", step_text))
    rows.append(("Training tokens", _fmt_int(checkpoint.tokens)))
    if checkpoint.tokens and checkpoint.step:
        per_step = f"{checkpoint.tokens // checkpoint.step:,} tokens per optimizer step"
    else:
        per_step = f"{_fmt_int(args.get('tokens_per_step'))} tokens per optimizer step (target)"
    if args.get("batch_size"):
        accumulation = args.get("gradient_accumulation_steps")
        per_step += f"; {args['batch_size']} sequences of {args.get('n_positions', '?')} tokens per device per " \
                    f"micro-batch, gradient accumulation {accumulation if accumulation else 'derived from it'}"
    rows.append(("Batch", per_step))
    if "learning_rate" in args:
        rows.append(("Schedule", f"peak learning rate {args['learning_rate']:g}, {_fmt_int(args.get('warmup_steps'))}"
                                 f" warm-up steps, then `{args.get('lr_scheduler', 'linear')}` decay to step "
                                 f"{_fmt_int(max_steps)}"))
        rows.append(("Optimizer", f"AdamW (β1 {args.get('adam_beta1', 0.9)}, β2 {args.get('adam_beta2', 0.999)}, "
                                  f"ε {args.get('adam_epsilon', 1e-8):g}), weight decay {args.get('weight_decay', 0)} "
                                  f"on matrices only, gradient clipping {args.get('max_grad_norm', 'none')}, "
                                  f"dropout {args.get('dropout', 'not recorded')}, seed {args.get('seed', '?')}"))
    precision = metrics.get("mixed_precision") or args.get("mixed_precision")
    rows.append(("Precision", f"mixed precision `{precision}`" if precision and precision != "no"
                 else "fp32" if precision == "no" else "Accelerate's configured default (not recorded)"))
    hardware = metrics.get("hardware") or args.get("hardware") or ("CPU" if args.get("cpu") else None)
    processes = metrics.get("num_processes") or args.get("num_processes")
    rows.append(("Hardware", str(hardware) + (f", {processes} process(es)" if processes else "") if hardware
                 else (f"{processes} process(es)" if processes else "not recorded")))
    time_text = _fmt_duration(metrics.get("wall_seconds") or metrics.get("train_seconds"))
    if metrics.get("train_seconds") and metrics.get("wall_seconds"):
        time_text += f" wall clock ({_fmt_duration(metrics['train_seconds'])} in the training loop)"
    if isinstance(metrics.get("tokens_per_second"), (int, float)):
        time_text += f", {metrics['tokens_per_second']:,.0f} tokens/s"
    rows.append(("Time", time_text))
    if metrics.get("start_step"):
        rows.append(("Resumed", f"from step {metrics['start_step']:,}"))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    note = "" if checkpoint.metrics_are_current else (
        f"\n\nThe run's arguments come from `{checkpoint.run_file}`, written at another step than these weights; "
        "the results below are therefore not recorded for this checkpoint.")
    return (f"## Training details\n\nTrained with the `backpack-gpt2` package (`train/pretrain.py`): the paper's "
            f"recipe, AdamW with warm-up and decay, next-token cross-entropy.\n\n| | |\n|---|---|\n{table}{note}\n")


def _evaluation_section(checkpoint: Checkpoint, data_prose: str) -> str:
    metrics = checkpoint.metrics

    def row(label: str, loss, perplexity) -> str:
        cells = [format(v, f) if isinstance(v, (int, float)) else "–" for v, f in ((loss, ".4f"), (perplexity, ".2f"))]
        return f"| {label} | {cells[0]} | {cells[1]} |"

    empty = " (0 tokens: the validation split is empty or shorter than one block)"
    rows = []
    if (start := measured_validation(metrics, "start_")) is not None:
        rows.append(row("validation, before training", *start))
    if (final := measured_validation(metrics)) is not None:
        rows.append(row("validation, these weights", *final))
    elif _zero_token_validation(metrics):
        rows.append(f"| validation, these weights | not measured{empty} | – |")
    elif rows:
        rows.append("| validation, these weights | not measured (the run stopped before its next evaluation) | – |")
    if _is_number(metrics.get("train_loss")):
        rows.append(row("training batch, last step", metrics["train_loss"], None))
    if not rows:
        if _zero_token_validation(metrics) or _zero_token_validation(metrics, "start_"):
            return f"## Evaluation\n\nNo validation was measured for these weights{empty}.\n"
        return "## Evaluation\n\nNo evaluation was recorded for these weights.\n"
    return (f"## Evaluation\n\nNext-token loss (nats per token) and perplexity on the held-out validation split of "
            f"{data_prose}, as the training run measured them.\n\n| | loss | perplexity |\n|---|---|---|\n"
            + "\n".join(rows) + "\n")


def _limitations_section(checkpoint: Checkpoint, data_prose: str) -> str:
    config = checkpoint.model.config
    tokens = f"{checkpoint.tokens:,} tokens of " if checkpoint.tokens else ""
    return f"""\
## Limitations

- A research model trained on {tokens}{data_prose} only, with no instruction tuning and no safety filtering.
  It reproduces the biases of its data; the paper measures gender bias in profession words and shows how
  editing a single sense reduces it, which does not make the model unbiased.
- It reads at most {config.n_positions} tokens. The vocabulary is GPT-2's 50,257 subwords padded to
  {config.vocab_size:,}; the padding ids are never seen in training.
- Senses are learned without supervision: which sense index means what differs from run to run, and a sense
  that reads well through its top words may still do other things in context.
- Loading runs the repository's Python code (`trust_remote_code=True`): read it, or pin a `revision`.
"""


def _summary_section(checkpoint: Checkpoint, model_name: str) -> str:
    config = checkpoint.model.config
    rows = [
        ("Parameters", f"{_count_parameters(checkpoint.model):,} (tied embeddings counted once)"),
        ("Senses per word (k)", str(config.num_senses)),
        ("Width / layers / heads", f"{config.n_embd} / {config.n_layer} / {config.n_head}"),
        ("Context", f"{config.n_positions} tokens"),
        ("Vocabulary", f"{config.vocab_size:,} (GPT-2 byte-level BPE)"),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"""\
# {model_name}

A **Backpack language model** ([Hewitt, Thickstun, Manning & Liang, ACL 2023](https://aclanthology.org/2023.acl-long.506)):
every word has {config.num_senses} non-contextual *sense vectors* `C(x)`; a GPT-2 Transformer only decides how to
weight them, `o_i = Σ_j Σ_l α[l, i, j] C(x_j)[l]`, and the logits are `E o_i`. Because the output is linear in
the senses, a sense can be read off through the vocabulary and edited to change predictions in every context.

| | |
|---|---|
{table}
"""


def build_model_card(checkpoint: Checkpoint, repo_id: str, revision: str | None = None,
                     license: str | None = None) -> ModelCard:
    """The README.md: metadata (license, library, pipeline, tags, datasets, language, model-index) and text.

    An existing card of the checkpoint keeps its text; its metadata gains what the Hub needs and the run's results.
    """
    model_name = repo_id.split("/")[-1]
    data_prose, data_name, data_id = describe_data(checkpoint.training_args)
    results = eval_results(checkpoint, data_name, data_id)
    existing = checkpoint.card
    if existing is not None:
        data = existing.data
        data.license = license or data.license or DEFAULT_LICENSE
        data.library_name = "transformers"
        data.pipeline_tag = "text-generation"
        data.tags = list(dict.fromkeys([*(data.tags or []), *CARD_TAGS]))
        data.language = data.language or "en"
        if data_id:
            data.datasets = list(dict.fromkeys([*(data.datasets or []), data_id]))
        if results:
            data.model_name = data.model_name or model_name
            data.eval_results = results
        elif _zero_token_validation(checkpoint.metrics):  # an older entry would now describe unmeasured weights
            data.eval_results = None
        return existing

    data = ModelCardData(
        model_name=model_name if results else None, license=license or DEFAULT_LICENSE, library_name="transformers",
        pipeline_tag="text-generation", tags=list(CARD_TAGS), language="en",
        datasets=[data_id] if data_id else None, metrics=["perplexity"] if results else None,
        eval_results=results or None,
    )
    sections = [
        _summary_section(checkpoint, model_name),
        _usage_section(repo_id, revision),
        _training_section(checkpoint, data_prose),
        _evaluation_section(checkpoint, data_prose),
        _limitations_section(checkpoint, data_prose),
        f"## Citation\n\n```bibtex\n{CITATION}\n```\n",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(sections))


# --- the staging folder --------------------------------------------------------------------------------------


@dataclass
class StagedFile:
    """One file of the staging folder, as it will be in the repo."""

    path: str  # relative to the staging folder, "/"-separated (as in the repo)
    size: int


def list_files(folder: Path) -> list[StagedFile]:
    """Every file under ``folder``, sorted, with its size."""
    return sorted((StagedFile(p.relative_to(folder).as_posix(), p.stat().st_size)
                   for p in folder.rglob("*") if p.is_file()), key=lambda f: f.path)


def _human_size(size: int) -> str:
    """Decimal units, as the Hub shows sizes."""
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def format_file_list(files: list[StagedFile]) -> str:
    """The dry run's listing: one file per line with its size, then the total."""
    width = max(len(f.path) for f in files)
    lines = [f"  {f.path:<{width}}  {_human_size(f.size):>9}" for f in files]
    lines.append(f"  {len(files)} files, {_human_size(sum(f.size for f in files))}")
    return "\n".join(lines)


def stage(checkpoint: Checkpoint, staging: str | os.PathLike, repo_id: str, *, revision: str | None = None,
          max_shard_size: str | int = "2GB", license: str | None = None, tokenizer=None) -> list[StagedFile]:
    """Write exactly what the Hub repo will hold into ``staging`` (an empty or missing folder)."""
    staging = Path(staging)
    if staging.exists() and any(staging.iterdir()):
        raise UsageError(f"--staging-dir {staging} is not empty")
    staging.mkdir(parents=True, exist_ok=True)
    model = checkpoint.model
    # Weights, config.json (auto_map, architectures) and generation_config.json; the code files are copied too
    # because the classes are registered for the Auto classes.
    model.save_pretrained(staging, max_shard_size=max_shard_size)
    for module in CODE_MODULES:  # the installed package's code, whatever an older export carried
        shutil.copyfile(module.__file__, staging / Path(module.__file__).name)
    _ensure_auto_map(staging / "config.json")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(checkpoint)
    tokenizer.save_pretrained(staging)
    build_model_card(checkpoint, repo_id, revision, license).save(staging / CARD_FILE)
    return list_files(staging)


def _write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder, fsync, then rename: never a half-written file."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _auto_map_is_current(config: dict) -> bool:
    """Whether ``architectures`` and ``auto_map`` already point ``AutoModelForCausalLM`` at the code files."""
    auto_map = config.get("auto_map") or {}
    return (config.get("architectures") == [BackpackGPT2LMHeadModel.__name__]
            and all(auto_map.get(key) == value for key, value in AUTO_MAP.items()))


def _ensure_auto_map(path: Path) -> None:
    """config.json must let ``AutoModelForCausalLM`` find the remote code: auto_map and architectures."""
    config = json.loads(path.read_text(encoding="utf-8"))
    config["architectures"] = [BackpackGPT2LMHeadModel.__name__]
    config.setdefault("auto_map", {}).update(AUTO_MAP)
    _write_text_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


# --- validation in a fresh process ---------------------------------------------------------------------------

# Runs with the staging folder and a reference file as arguments; prints one JSON line. It imports nothing of
# this package: the model must come from the staging folder's own code, as it will from the Hub.
_VALIDATION_SCRIPT = r"""
import json, sys, traceback
result = {"ok": False}
try:
    import torch
    from transformers import AutoModelForCausalLM, pipeline
    staging, reference_path, prompt, new_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    tokenizer = sys.argv[5] if len(sys.argv) > 5 else staging
    reference = torch.load(reference_path, weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(staging, trust_remote_code=True).eval()
    result["model_class"] = f"{type(model).__module__}.{type(model).__qualname__}"
    with torch.no_grad():
        logits = model(reference["input_ids"], attention_mask=reference["attention_mask"]).logits
    expected = reference["logits"]
    result["shape_ok"] = list(logits.shape) == list(expected.shape)
    result["logits_equal"] = bool(result["shape_ok"] and torch.equal(logits, expected))
    result["max_abs_diff"] = float((logits.float() - expected.float()).abs().max()) if result["shape_ok"] else None
    generator = pipeline("text-generation", model=staging, tokenizer=tokenizer, trust_remote_code=True)
    output = generator(prompt, max_new_tokens=new_tokens, do_sample=False)
    result["generated_text"] = output[0]["generated_text"]
    result["ok"] = True
except Exception as error:
    result["error"] = f"{type(error).__name__}: {error}"
    result["traceback"] = traceback.format_exc(limit=6)
print("VALIDATION-RESULT " + json.dumps(result))
"""


@dataclass
class ValidationReport:
    """What the fresh process saw."""

    model_class: str
    logits_equal: bool
    max_abs_diff: float
    prompt: str
    generated_text: str
    seconds: float

    def summary(self) -> str:
        return (f"loaded as {self.model_class}; logits {'identical' if self.logits_equal else 'NOT identical'} to the "
                f"checkpoint's (max |diff| {self.max_abs_diff:.1e}); pipeline: {self.generated_text!r}")


def reference_batch(model: BackpackGPT2LMHeadModel, tokenizer) -> dict[str, torch.Tensor]:
    """A fixed input (the prompt, plus a left-padded shorter copy) and the checkpoint's logits for it."""
    ids = tokenizer(VALIDATION_PROMPT, add_special_tokens=False).input_ids[: model.config.n_positions]
    short = ids[: max(1, len(ids) // 2)]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else (model.config.eos_token_id or 0)
    input_ids = torch.tensor([ids, [pad] * (len(ids) - len(short)) + short])
    attention_mask = torch.tensor([[1] * len(ids), [0] * (len(ids) - len(short)) + [1] * len(short)])
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask).logits
    return {"input_ids": input_ids, "attention_mask": attention_mask, "logits": logits}


def validate_staging(staging: str | os.PathLike, reference: dict[str, torch.Tensor], *,
                     tokenizer_dir: str | os.PathLike | None = None, timeout: float = 900.0) -> ValidationReport:
    """Load ``staging`` with remote code in a fresh process, compare logits with ``reference``, run the pipeline.

    Args:
        tokenizer_dir: The pipeline's tokenizer, for a staging folder without one (default: the staging folder).

    Raises:
        ValidationFailed: with the reason (import error, mismatch, pipeline failure, timeout).
    """
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="backpack-validate-") as scratch:
        reference_path = Path(scratch) / "reference.pt"
        torch.save(reference, reference_path)
        env = dict(os.environ)
        # Its own module cache (no stale copy of the code from an earlier folder of the same name), no network,
        # and a working directory without this package's modules (the result also checks where the class came from).
        env.update(HF_MODULES_CACHE=str(Path(scratch) / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false")
        command = [sys.executable, "-c", _VALIDATION_SCRIPT, str(Path(staging).resolve()), str(reference_path),
                   VALIDATION_PROMPT, str(VALIDATION_NEW_TOKENS)]
        if tokenizer_dir is not None:
            command.append(str(Path(tokenizer_dir).resolve()))
        try:
            process = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as error:
            raise ValidationFailed(f"validation did not finish in {timeout:.0f}s") from error
    line = next((l for l in reversed(process.stdout.splitlines()) if l.startswith("VALIDATION-RESULT ")), None)
    if line is None:
        tail = (process.stderr or process.stdout).strip().splitlines()[-8:]
        raise ValidationFailed(f"the validation process exited with code {process.returncode}:\n  "
                               + "\n  ".join(tail))
    result = json.loads(line[len("VALIDATION-RESULT "):])
    if not result["ok"]:
        raise ValidationFailed(f"the staging folder does not load or generate: {result['error']}\n"
                               + textwrap.indent(result.get("traceback", "").strip(), "  "))
    if not result["model_class"].startswith("transformers_modules."):
        raise ValidationFailed(f"the model loaded as {result['model_class']}, not from the folder's remote code")
    if not result["shape_ok"]:
        raise ValidationFailed("the staging folder's logits have another shape than the checkpoint's")
    if not result["logits_equal"]:
        raise ValidationFailed(f"the staging folder's logits differ from the checkpoint's (max |diff| "
                               f"{result['max_abs_diff']:.3g}) on {VALIDATION_PROMPT!r}")
    if not result["generated_text"].startswith(VALIDATION_PROMPT):
        raise ValidationFailed(f"the pipeline returned {result['generated_text']!r}, which does not continue the "
                               "prompt")
    return ValidationReport(result["model_class"], True, result["max_abs_diff"], VALIDATION_PROMPT,
                            result["generated_text"], time.perf_counter() - started)


# --- the push -------------------------------------------------------------------------------------------------


def parse_repo_id(repo_id: str) -> str:
    """``OWNER/NAME`` of a model repo (a model URL is accepted); dataset and Space ids are refused."""
    text = repo_id.strip().rstrip("/")
    text = re.sub(r"^https?://(www\.)?huggingface\.co/", "", text)
    if text.startswith(("datasets/", "spaces/")):
        kind = text.split("/")[0][:-1]
        raise RepoMismatch(f"{repo_id} is a {kind} repo; models are published to a model repo: --repo-id OWNER/NAME")
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except hub_errors.HFValidationError as error:
        raise UsageError(f"invalid --repo-id {repo_id!r}: {error}") from error
    if text.count("/") != 1:
        raise UsageError(f"--repo-id must be OWNER/NAME (the user or organisation that will own it), got {repo_id!r}")
    return text


def _status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _token_hint() -> str:
    return ("create a token with write access at https://huggingface.co/settings/tokens, then run `hf auth login`, "
            "set HF_TOKEN, or pass --token")


@contextmanager
def hub_errors_as_messages(repo_id: str, action: str) -> Iterator[None]:
    """Turn what HfApi raises into the tool's errors: one message and exit code per cause, with what to do."""
    try:
        yield
    except HubUploadError:
        raise
    except hub_errors.OfflineModeIsEnabled as error:
        raise HubUnreachable(f"{action}: HF_HUB_OFFLINE is set, so the Hub is not contacted; unset it to push "
                             "(nothing was pushed)") from error
    except hub_errors.LocalTokenNotFoundError as error:
        raise AuthenticationError(f"{action}: no Hugging Face token; {_token_hint()}") from error
    except hub_errors.LocalEntryNotFoundError as error:  # a download that found neither the Hub nor a cached copy
        offline = "HF_HUB_OFFLINE is set and " if hub_constants.HF_HUB_OFFLINE else "the Hub could not be reached and "
        raise HubUnreachable(f"{action}: {offline}{repo_id} is not in the Hub cache ({hub_constants.HF_HUB_CACHE}). "
                             "Nothing was pushed") from error
    except hub_errors.HfHubHTTPError as error:
        status = _status(error)
        server = f" The Hub said: {error.server_message}" if getattr(error, "server_message", None) else ""
        if status == 401 and not isinstance(error, hub_errors.RepositoryNotFoundError):
            raise AuthenticationError(f"{action}: the Hub rejected the token (401: invalid or expired).{server} "
                                      f"Nothing was pushed; {_token_hint()}") from error
        if isinstance(error, hub_errors.RevisionNotFoundError):
            raise HubUploadError(f"{action}: the branch does not exist in {repo_id} ({error})") from error
        if status == 403:
            raise PermissionDenied(f"{action}: the token may not write to {repo_id} (403 Forbidden).{server} Nothing "
                                   "was pushed; use a token with the write role, or a fine-grained token with write "
                                   f"access to {repo_id.split('/')[0]}'s repos, or push to your own namespace"
                                   ) from error
        if isinstance(error, hub_errors.RepositoryNotFoundError) or status in (401, 404):
            raise PermissionDenied(f"{action}: {repo_id} is not visible to this token (it may be private, belong to "
                                   f"someone else, or not exist). Nothing was pushed; check the name and that the "
                                   "token can write to that namespace") from error
        if status is not None and status >= 500:
            raise HubUnreachable(f"{action}: the Hub answered {status} (server error). Nothing was pushed; retry "
                                 "later") from error
        raise HubUploadError(f"{action} failed ({status}): {error}") from error
    except (hub_errors.HTTPError, ConnectionError, TimeoutError) as error:
        raise HubUnreachable(f"{action}: could not reach the Hub ({type(error).__name__}: {error}). Nothing was "
                             "pushed; check the network (and HF_ENDPOINT / proxy settings), then run the command "
                             "again") from error


def check_token(api: HfApi, token: str | None, repo_id: str, *, own_namespace: bool = True) -> str:
    """The token to use, after the Hub confirmed it (whoami) and it can plausibly write to the owner's namespace.

    Args:
        own_namespace: Require the repo's owner to be the user or one of their organisations (a push); False for a
            pull request, which anyone with a write token may open on a public repo.

    Raises:
        AuthenticationError: no token, or the Hub rejects it.
        PermissionDenied: a read-only token, or a namespace the user does not belong to.
    """
    token = token or get_token()
    if not token:
        raise AuthenticationError(f"no Hugging Face token found; {_token_hint()}")
    with hub_errors_as_messages(repo_id, "checking the token"):
        # whoami is rate-limited: a trainer pushing at every save point asks once per process.
        cached = {"cache": True} if "cache" in inspect.signature(api.whoami).parameters else {}
        me = api.whoami(token=token, **cached)
    access = ((me.get("auth") or {}).get("accessToken") or {})
    if access.get("role") == "read":
        raise PermissionDenied(f"the token {access.get('displayName', '')!r} is read-only; {_token_hint()}")
    owner = repo_id.split("/")[0]
    namespaces = {me.get("name")} | {org.get("name") for org in me.get("orgs") or []}
    if own_namespace and me.get("type") == "user" and owner not in namespaces:
        raise PermissionDenied(f"{me.get('name')} can't create repos under {owner!r} (your namespaces: "
                               f"{', '.join(sorted(n for n in namespaces if n))}); choose --repo-id in one of them")
    return token


def push_staging(api: HfApi, staging: Path, repo_id: str, *, token: str, revision: str | None = None,
                 private: bool = False, commit_message: str, commit_description: str | None = None) -> str:
    """Create the repo (and branch) if needed and push the whole staging folder as ONE commit; returns its URL.

    Remote weight files that the staging folder does not hold (old shards, an old index) are deleted in the same
    commit, so the repo never mixes two checkpoints; any other file already in the repo is left as it is.
    """
    with hub_errors_as_messages(repo_id, "creating the repo"):
        url = api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
        if getattr(url, "repo_type", "model") not in (None, "model"):
            raise RepoMismatch(f"{repo_id} exists as a {url.repo_type} repo; choose another name for the model")
        if private and getattr(api.repo_info(repo_id, repo_type="model", token=token), "private", True) is False:
            raise RepoMismatch(f"{repo_id} already exists and is public, but --private was asked: nothing was "
                               "pushed. Make it private in its settings first, or choose another --repo-id")
    if revision and revision != "main":
        with hub_errors_as_messages(repo_id, f"creating the branch {revision!r}"):
            api.create_branch(repo_id, branch=revision, token=token, repo_type="model", exist_ok=True)

    files = list_files(staging)
    with hub_errors_as_messages(repo_id, "listing the repo"):
        remote = api.list_repo_files(repo_id, revision=revision, repo_type="model", token=token)
    staged = {f.path for f in files}
    operations: list = [CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=str(staging / f.path)) for f in files]
    operations += [CommitOperationDelete(path_in_repo=path) for path in remote
                   if path not in staged and STALE_WEIGHT_PATTERN.search(path)]
    with hub_errors_as_messages(repo_id, "pushing the commit"):
        info = api.create_commit(repo_id, operations, commit_message=commit_message,
                                 commit_description=commit_description, token=token, repo_type="model",
                                 revision=revision)
    return info.commit_url


_API: HfApi | None = None


def _hub_api() -> HfApi:
    """One HfApi per process, so that its whoami cache spares the rate-limited endpoint at every save point."""
    global _API
    if _API is None:
        _API = HfApi()
    return _API


def _default_commit_message(checkpoint: Checkpoint) -> str:
    step = f" at step {checkpoint.step:,}" if checkpoint.step is not None else ""
    return f"Upload Backpack GPT-2{step} with hub_upload.py"


def push_checkpoint(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    max_shard_size: str | int = "2GB",
    license: str | None = None,
    staging_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> str | None:
    """Stage CHECKPOINT, validate it in a fresh process and push it to ``repo_id`` as one commit.

    Args:
        folder: An exported model folder, or an Accelerate checkpoint of the same run.
        repo_id: ``OWNER/NAME`` of the model repo (created if missing).
        revision: Branch to push to (created from main if missing); None: main.
        private: Create the repo private (and refuse to push to an existing public one).
        token: Hugging Face token; None: ``huggingface_hub.get_token()`` (HF_TOKEN or ``hf auth login``).
        commit_message: Default: "Upload Backpack GPT-2 at step N with hub_upload.py".
        dry_run: Do everything but the push (no token, no network); log the file list with sizes.
        max_shard_size: Weights above this are sharded into ``model-0000i-of-0000n.safetensors`` + an index.
        license: The card's license (default: the existing card's, else apache-2.0).
        staging_dir: Where to build the staging folder and keep it (empty or missing); None: a temporary folder.
        log: Where progress lines go.

    Returns:
        The commit URL, or None for a dry run.

    Raises:
        HubUploadError: a subclass per cause, with ``exit_code`` and a message that says what to do.
    """
    repo_id = parse_repo_id(repo_id)
    api = _hub_api()
    if not dry_run:  # fail on the token before minutes of staging and validation
        token = check_token(api, token, repo_id)

    log(f"[1/4] Reading checkpoint {folder}")
    checkpoint = load_checkpoint(folder)
    log(f"      {checkpoint.kind} checkpoint, {_count_parameters(checkpoint.model):,} parameters"
        + (f", step {checkpoint.step:,}" if checkpoint.step is not None else "")
        + (f", run record {checkpoint.run_file}" if checkpoint.run_file else ", no run record found"))
    with _staging_folder(staging_dir) as staging:
        log(f"[2/4] Staging the repo contents in {staging}")
        tokenizer = load_tokenizer(checkpoint)
        files = stage(checkpoint, staging, repo_id, revision=revision, max_shard_size=max_shard_size,
                      license=license, tokenizer=tokenizer)
        log("[3/4] Validating in a fresh process (remote code, logits, pipeline)")
        reference = reference_batch(checkpoint.model, tokenizer)
        try:
            report = validate_staging(staging, reference)
        except ValidationFailed as error:
            raise ValidationFailed(f"validation failed, nothing was pushed: {error}") from error
        log(f"      ok in {report.seconds:.0f}s: {report.summary()}")
        where = f"{repo_id}" + (f" (branch {revision})" if revision else "") + (" [private]" if private else "")
        if dry_run:
            log(f"[4/4] Dry run: this commit to {where} would hold:\n{format_file_list(files)}")
            if staging_dir is None:
                log("      (--staging-dir DIR keeps these files, README.md included, for a look before pushing)")
            return None
        log(f"[4/4] Pushing {len(files)} files to {where} as one commit")
        url = push_staging(api, staging, repo_id, token=token, revision=revision, private=private,
                           commit_message=commit_message or _default_commit_message(checkpoint),
                           commit_description=f"Validated: {report.summary()}")
        log(f"Pushed: {url}")
        return url


@contextmanager
def _staging_folder(staging_dir: str | os.PathLike | None) -> Iterator[Path]:
    """The given folder (kept afterwards), or a temporary one (removed)."""
    if staging_dir is not None:
        yield Path(staging_dir)
        return
    with tempfile.TemporaryDirectory(prefix="backpack-hub-staging-") as scratch:
        yield Path(scratch) / "repo"


# --- proposing this package's code to an existing repo: one pull request ----------------------------------------

CODE_UPDATE_MESSAGE = "Update the model code for transformers 5 (backpack-gpt2 package)"
COMMIT_OID = re.compile(r"[0-9a-f]{40}")


def stage_code_update(snapshot: str | os.PathLike, staging: str | os.PathLike) -> list[StagedFile]:
    """The repo's files with the installed model code swapped in (and ``auto_map`` fixed if needed).

    Weight files are linked to the downloaded snapshot, never copied or rewritten; every other file is copied.

    Returns:
        The files that differ from the repo's (what the pull request changes), possibly none.
    """
    snapshot, staging = Path(snapshot), Path(staging)
    if staging.exists() and any(staging.iterdir()):
        raise UsageError(f"--staging-dir {staging} is not empty")
    staging.mkdir(parents=True, exist_ok=True)
    for path in sorted(snapshot.rglob("*")):
        relative = path.relative_to(snapshot).as_posix()
        if path.is_dir() or relative.startswith("."):  # .gitattributes stays as it is in the repo
            continue
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if STALE_WEIGHT_PATTERN.search(relative):
            target.symlink_to(path.resolve())
        else:
            shutil.copyfile(path, target)

    changed = []
    for module in CODE_MODULES:
        source = Path(module.__file__)
        target = staging / source.name
        if not target.is_file() or target.read_bytes() != source.read_bytes():
            shutil.copyfile(source, target)
            changed.append(source.name)
    config_path = staging / "config.json"
    if not _auto_map_is_current(_read_json(config_path)):
        _ensure_auto_map(config_path)
        changed.append("config.json")
    return [file for file in list_files(staging) if file.path in changed]


def _code_update_description(report: ValidationReport) -> str:
    return (
        "The repo's model code dates from 2023 and no longer loads on transformers 5 (for instance `AttributeError: "
        "'BackpackGPT2LMHeadModel' object has no attribute 'all_tied_weights_keys'`). This pull request replaces "
        "`configuration_backpack_gpt2.py` and `modeling_backpack_gpt2.py` with those of the checkpoint-compatible "
        "`backpack-gpt2` package (and sets `auto_map` in `config.json` where needed). The weights are untouched.\n\n"
        f"Validated before opening it, in a fresh process with `trust_remote_code=True`: {report.summary()}"
    )


def update_code(
    repo_id: str,
    *,
    token: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    staging_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
):
    """Open a pull request on an existing Backpack model repo that swaps in this package's two model files.

    Downloads the repo's snapshot (main), swaps in the installed ``configuration_backpack_gpt2.py`` and
    ``modeling_backpack_gpt2.py`` (and ``auto_map`` in config.json if needed; weights untouched), checks in a fresh
    process that ``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`` loads the result and gives
    the same logits as the installed classes on the repo's weights, then opens ONE pull request with the changed
    files, based on the validated commit.

    Args:
        repo_id: ``OWNER/NAME`` of the model repo, e.g. ``stanfordnlp/backpack-gpt2``.
        token: Hugging Face token with write access (a pull request needs no membership of the owner's namespace).
        commit_message: The pull request's title (default: ``CODE_UPDATE_MESSAGE``).
        dry_run: Download, stage and validate, then list what the pull request would change (no token needed).
        staging_dir: Where to build the staging folder and keep it (empty or missing); None: a temporary folder.
        log: Where progress lines go.

    Returns:
        The ``CommitInfo`` of the pull request (``pr_url``, ``pr_revision`` = ``"refs/pr/N"``), or None for a dry
        run or a repo that already has this code.

    Raises:
        HubUploadError: a subclass per cause, with ``exit_code`` and a message that says what to do.
    """
    repo_id = parse_repo_id(repo_id)
    api = _hub_api()
    if not dry_run:  # fail on the token before downloading the weights
        token = check_token(api, token, repo_id, own_namespace=False)

    log(f"[1/4] Downloading the snapshot of {repo_id} (main)")
    with hub_errors_as_messages(repo_id, f"downloading {repo_id}"):
        snapshot = Path(api.snapshot_download(repo_id, repo_type="model", token=token))
    commit = snapshot.name if COMMIT_OID.fullmatch(snapshot.name) else None
    if not (snapshot / "config.json").is_file():
        raise CheckpointError(f"{repo_id} has no config.json: not a transformers model repo")
    config = _read_json(snapshot / "config.json")
    if not is_backpack_config(config):
        raise CheckpointError(f"{repo_id}'s config.json is not a Backpack GPT-2 configuration (model_type "
                              f"{config.get('model_type')!r}, architectures {config.get('architectures')}); "
                              "--update-code proposes the Backpack model code only")
    log(f"      commit {commit or 'unknown'}, {len(list_files(snapshot))} files")

    with _staging_folder(staging_dir) as staging:
        log(f"[2/4] Staging the repo with this package's model code in {staging}")
        changed = stage_code_update(snapshot, staging)
        if not changed:
            log(f"{repo_id} already has this package's model code and auto_map: nothing to propose")
            return None
        log("[3/4] Validating in a fresh process (the repo's weights with the new code, trust_remote_code=True)")
        try:  # the reference: the installed classes on the same weights (the repo's own code is not imported)
            model, tokenizer = load_model(snapshot, require_backpack=True)
        except ModelLoadError as error:
            raise CheckpointError(f"{repo_id}: {error}") from error
        reference = reference_batch(model, tokenizer)
        with tempfile.TemporaryDirectory(prefix="backpack-tokenizer-") as scratch:
            has_tokenizer = any((staging / name).is_file() for name in TOKENIZER_MARKERS)
            if not has_tokenizer:  # the pipeline check needs one; the published repo ships none (it is GPT-2's)
                tokenizer.save_pretrained(scratch)
            try:
                report = validate_staging(staging, reference, tokenizer_dir=None if has_tokenizer else scratch)
            except ValidationFailed as error:
                raise ValidationFailed(f"validation failed, no pull request was opened: {error}") from error
        log(f"      ok in {report.seconds:.0f}s: {report.summary()}")
        if dry_run:
            log(f"[4/4] Dry run: the pull request on {repo_id} would change these files (weights untouched):\n"
                f"{format_file_list(changed)}")
            return None
        log(f"[4/4] Opening a pull request on {repo_id} with {len(changed)} files")
        operations = [CommitOperationAdd(path_in_repo=file.path, path_or_fileobj=str(staging / file.path))
                      for file in changed]
        with hub_errors_as_messages(repo_id, "opening the pull request"):
            info = api.create_commit(repo_id, operations, commit_message=commit_message or CODE_UPDATE_MESSAGE,
                                     commit_description=_code_update_description(report), token=token,
                                     repo_type="model", create_pr=True, parent_commit=commit)
        log(f"Opened pull request: {info.pr_url}")
        log(f'Until it is merged, load it with revision="{info.pr_revision}": AutoModelForCausalLM.from_pretrained('
            f'"{repo_id}", revision="{info.pr_revision}", trust_remote_code=True)')
        return info


# --- command line --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hub_upload.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Exit codes:"):], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", nargs="?",
                        help="exported model folder (config.json + weights) or Accelerate checkpoint folder")
    parser.add_argument("--repo-id", metavar="OWNER/NAME", help="model repo to publish to (with CHECKPOINT)")
    parser.add_argument("--update-code", metavar="OWNER/NAME", default=None,
                        help="instead of publishing a checkpoint: open a pull request on this existing Backpack "
                             "repo that replaces its two model code files with the installed ones (and fixes "
                             "auto_map), weights untouched, after validating it (with --dry-run: validate only)")
    parser.add_argument("--revision", metavar="BRANCH", default=None,
                        help="branch to push to (created from main if missing; default: main)")
    parser.add_argument("--private", action="store_true",
                        help="create the repo private (and refuse to push to an existing public repo)")
    parser.add_argument("--commit-message", default=None, help="default: 'Upload Backpack GPT-2 at step N ...'")
    parser.add_argument("--token", default=None,
                        help="Hugging Face token with write access (default: HF_TOKEN or `hf auth login`)")
    parser.add_argument("--dry-run", action="store_true",
                        help="stage and validate, then print the files with sizes instead of pushing (no token needed)")
    parser.add_argument("--max-shard-size", default="2GB", metavar="SIZE",
                        help="shard the weights above this size, with an index (default: 2GB)")
    parser.add_argument("--license", default=None, help="card license (default: the existing card's, else apache-2.0)")
    parser.add_argument("--staging-dir", default=None, metavar="DIR",
                        help="build the staging folder here and keep it (must be empty or missing)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.update_code is not None:
        publishing = {"CHECKPOINT": args.checkpoint, "--repo-id": args.repo_id, "--revision": args.revision,
                      "--private": args.private, "--license": args.license,
                      "--max-shard-size": args.max_shard_size != parser.get_default("max_shard_size")}
        extra = [name for name, value in publishing.items() if value]
        if extra:
            parser.error(f"--update-code opens a pull request on an existing repo's main branch; {', '.join(extra)} "
                         "belong to publishing a checkpoint")
    elif args.checkpoint is None or args.repo_id is None:
        parser.error("give CHECKPOINT and --repo-id OWNER/NAME to publish, or --update-code OWNER/NAME")
    try:
        if args.update_code is not None:
            update_code(args.update_code, token=args.token, commit_message=args.commit_message, dry_run=args.dry_run,
                        staging_dir=args.staging_dir)
        else:
            push_checkpoint(args.checkpoint, args.repo_id, revision=args.revision, private=args.private,
                            token=args.token, commit_message=args.commit_message, dry_run=args.dry_run,
                            max_shard_size=args.max_shard_size, license=args.license, staging_dir=args.staging_dir)
    except HubUploadError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
