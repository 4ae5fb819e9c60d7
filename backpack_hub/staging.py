"""The staging folder: exactly what the Hub repo will hold, built before anything is sent.

Weights (sharded above a size, with an index), ``config.json`` whose ``auto_map`` points ``AutoModelForCausalLM``
at the installed model code, the two code files, the tokenizer, ``generation_config.json`` and the model card.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import configuration_backpack_gpt2
import modeling_backpack_gpt2
from backpack.files import write_text_atomically
from modeling_backpack_gpt2 import BackpackGPT2LMHeadModel

from .card import build_model_card
from .checkpoint import CARD_FILE, Checkpoint, load_tokenizer
from .errors import UsageError

CODE_MODULES = (configuration_backpack_gpt2, modeling_backpack_gpt2)

# What config.json needs for AutoModelForCausalLM(..., trust_remote_code=True) to find the code files.
AUTO_MAP = {"AutoConfig": "configuration_backpack_gpt2.BackpackGPT2Config",
            "AutoModelForCausalLM": "modeling_backpack_gpt2.BackpackGPT2LMHeadModel"}

# Remote weight files that a new push replaces: a stale shard or index next to new weights would break loading.
STALE_WEIGHT_PATTERN = re.compile(r"(^|/)(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")


@dataclass
class StagedFile:
    """One file of the staging folder, as it will be in the repo."""

    path: str  # relative to the staging folder, "/"-separated (as in the repo)
    size: int


def list_files(folder: Path) -> list[StagedFile]:
    """Every file under ``folder``, sorted, with its size."""
    return sorted((StagedFile(p.relative_to(folder).as_posix(), p.stat().st_size)
                   for p in folder.rglob("*") if p.is_file()), key=lambda f: f.path)


def human_size(size: int) -> str:
    """Decimal units, as the Hub shows sizes."""
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def format_file_list(files: list[StagedFile]) -> str:
    """The dry run's listing: one file per line with its size, then the total."""
    width = max(len(f.path) for f in files)
    lines = [f"  {f.path:<{width}}  {human_size(f.size):>9}" for f in files]
    lines.append(f"  {len(files)} files, {human_size(sum(f.size for f in files))}")
    return "\n".join(lines)


def check_staging_dir(staging: str | os.PathLike) -> Path:
    """``staging`` if it is missing or an empty folder (checked before any work; nothing is created).

    Raises:
        UsageError: it is a file or a folder with files in it (naming ``--staging-dir``).
    """
    staging = Path(staging)
    if staging.exists() and not staging.is_dir():
        raise UsageError(f"--staging-dir {staging} is a file; expected an empty or missing folder")
    try:
        if staging.exists() and any(staging.iterdir()):
            raise UsageError(f"--staging-dir {staging} is not empty; expected an empty or missing folder")
    except OSError as error:
        raise UsageError(f"--staging-dir {staging}: can't read the folder ({error.strerror or error})") from error
    return staging


def make_staging_dir(staging: str | os.PathLike) -> Path:
    """Create the staging folder, which must be missing or an empty folder.

    Raises:
        UsageError: it is a file, a folder with files in it, or can't be created (naming ``--staging-dir``).
    """
    staging = check_staging_dir(staging)
    try:
        staging.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--staging-dir {staging}: can't create or read the folder "
                         f"({error.strerror or error})") from error
    return staging


def stage(checkpoint: Checkpoint, staging: str | os.PathLike, repo_id: str, *, revision: str | None = None,
          max_shard_size: str | int = "2GB", license: str | None = None, tokenizer=None) -> list[StagedFile]:
    """Write exactly what the Hub repo will hold into ``staging`` (an empty or missing folder)."""
    staging = make_staging_dir(staging)
    model = checkpoint.model
    # Weights, config.json (auto_map, architectures) and generation_config.json; the code files are copied too
    # because the classes are registered for the Auto classes.
    model.save_pretrained(staging, max_shard_size=max_shard_size)
    for module in CODE_MODULES:  # the installed package's code, whatever an older export carried
        shutil.copyfile(module.__file__, staging / Path(module.__file__).name)
    ensure_auto_map(staging / "config.json")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(checkpoint)
    save_tokenizer_without_code(tokenizer, staging)
    build_model_card(checkpoint, repo_id, revision, license).save(staging / CARD_FILE)
    return list_files(staging)


def save_tokenizer_without_code(tokenizer, folder: Path) -> None:
    """``tokenizer.save_pretrained(folder)`` minus any ``auto_map``: the code it would name is never shipped or run.

    A tokenizer read from files whose ``tokenizer_config.json`` had an ``auto_map`` (loaded without that code, as
    its ``tokenizer_class``) keeps the entry in ``init_kwargs`` and would write it back.
    """
    tokenizer.save_pretrained(folder)
    path = Path(folder) / "tokenizer_config.json"
    if path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(config, dict) and config.pop("auto_map", None) is not None:
            write_text_atomically(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def auto_map_is_current(config: dict) -> bool:
    """Whether ``architectures`` and ``auto_map`` already point ``AutoModelForCausalLM`` at the code files."""
    auto_map = config.get("auto_map") or {}
    return (config.get("architectures") == [BackpackGPT2LMHeadModel.__name__]
            and all(auto_map.get(key) == value for key, value in AUTO_MAP.items()))


def ensure_auto_map(path: Path) -> None:
    """config.json must let ``AutoModelForCausalLM`` find the remote code: auto_map and architectures."""
    config = json.loads(path.read_text(encoding="utf-8"))
    config["architectures"] = [BackpackGPT2LMHeadModel.__name__]
    config.setdefault("auto_map", {}).update(AUTO_MAP)
    write_text_atomically(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


@contextmanager
def staging_folder(staging_dir: str | os.PathLike | None) -> Iterator[Path]:
    """The given folder (kept afterwards), or a temporary one (removed)."""
    if staging_dir is not None:
        yield Path(staging_dir)
        return
    with tempfile.TemporaryDirectory(prefix="backpack-hub-staging-") as scratch:
        yield Path(scratch) / "repo"
