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
    ensure_auto_map(staging / "config.json")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(checkpoint)
    tokenizer.save_pretrained(staging)
    build_model_card(checkpoint, repo_id, revision, license).save(staging / CARD_FILE)
    return list_files(staging)


def write_text_atomic(path: Path, text: str) -> None:
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
    write_text_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


@contextmanager
def staging_folder(staging_dir: str | os.PathLike | None) -> Iterator[Path]:
    """The given folder (kept afterwards), or a temporary one (removed)."""
    if staging_dir is not None:
        yield Path(staging_dir)
        return
    with tempfile.TemporaryDirectory(prefix="backpack-hub-staging-") as scratch:
        yield Path(scratch) / "repo"
