"""Proposing this package's model code to an existing Backpack repo on the Hub, as one validated pull request.

The repo's snapshot is downloaded and a validation folder built from it: the repo's weights (linked, never
rewritten) and configuration, and the two installed code files (``auto_map`` set in ``config.json`` if needed),
nothing else. The repo's own code never runs: neither its code files nor anything else it holds (a
``custom_generate/generate.py``, a tokenizer ``auto_map`` and its module) enters that folder, and the tokenizer is
loaded without ``trust_remote_code``. The folder is loaded in a fresh process with ``trust_remote_code=True`` (so
the installed code is what runs) and compared with the installed classes on the same weights; only then is ONE
pull request opened, based on the commit that was validated. Code of the repo that the pull request leaves as it
is, and that the validation therefore did not cover, is named in the output and in the pull request.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import CommitOperationAdd

from backpack.loading import (
    TOKENIZER_FILES,
    ModelLoadError,
    is_backpack_config,
    load_pretrained_model,
    load_tokenizer,
)
from backpack.tokenizer import gpt2_tokenizer

from .checkpoint import read_json
from .errors import CheckpointError, ValidationFailed
from .hub import check_token, hub_api, hub_errors_as_messages, parse_repo_id
from .staging import (
    AUTO_MAP,
    CODE_MODULES,
    StagedFile,
    auto_map_is_current,
    ensure_auto_map,
    format_file_list,
    list_files,
    make_staging_dir,
    save_tokenizer_without_code,
    staging_folder,
)
from .validation import ValidationReport, reference_batch, validate_staging

CODE_UPDATE_MESSAGE = "Update the model code for transformers 5 (backpack-gpt2 package)"
COMMIT_OID = re.compile(r"[0-9a-f]{40}")


# The repo's files that the validation folder takes: weights (one file, or shards and their index) and configuration.
VALIDATED_FILE = re.compile(r"(config|generation_config)\.json|(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)"
                            r"(\.index\.json)?")


def stage_code_update(snapshot: str | os.PathLike, staging: str | os.PathLike) -> list[StagedFile]:
    """The validation folder: the repo's weights and configuration with the installed model code swapped in.

    ``config.json`` and ``generation_config.json`` are copied (``config.json`` may be rewritten), the weights are
    linked to the downloaded snapshot, never copied or changed; the two code files are the installed ones. No other
    file of the repo is taken: none of its code can be imported from this folder.

    Returns:
        The files that differ from the repo's (what the pull request changes), possibly none.
    """
    snapshot, staging = Path(snapshot), make_staging_dir(staging)
    for path in sorted(snapshot.iterdir()):
        if not path.is_file() or not VALIDATED_FILE.fullmatch(path.name):
            continue
        if path.name.endswith(".json"):
            shutil.copyfile(path, staging / path.name)  # a file of its own: writing it never touches the Hub cache
        else:
            (staging / path.name).symlink_to(path.resolve())

    changed = []
    for module in CODE_MODULES:
        source = Path(module.__file__)
        if not (snapshot / source.name).is_file() or (snapshot / source.name).read_bytes() != source.read_bytes():
            changed.append(source.name)
        shutil.copyfile(source, staging / source.name)
    config_path = staging / "config.json"
    if not auto_map_is_current(read_json(config_path)):
        ensure_auto_map(config_path)
        changed.append("config.json")
    return [file for file in list_files(staging) if file.path in changed]


def code_left_as_is(snapshot: str | os.PathLike) -> list[str]:
    """What of the repo can run code for its users that the pull request does not replace (so never validated).

    Python files other than the two model files, and ``auto_map`` / ``custom_pipelines`` entries of its JSON
    files other than the ``AutoConfig`` / ``AutoModelForCausalLM`` entries that point at the model files.
    """
    snapshot = Path(snapshot)
    replaced = {Path(module.__file__).name for module in CODE_MODULES}
    found = [path.relative_to(snapshot).as_posix() for path in sorted(snapshot.rglob("*.py"))
             if path.is_file() and path.relative_to(snapshot).as_posix() not in replaced]
    for path in sorted(snapshot.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        auto_map = data.get("auto_map") if isinstance(data.get("auto_map"), dict) else {}
        found += [f"{path.name} auto_map {key} -> {value}" for key, value in auto_map.items()
                  if not (path.name == "config.json" and key in AUTO_MAP)]
        if data.get("custom_pipelines"):
            found.append(f"{path.name} custom_pipelines {', '.join(map(str, data['custom_pipelines']))}")
    return found


def _reference_tokenizer(snapshot: Path, model, log: Callable[[str], None]):
    """The repo's tokenizer loaded without its code, else GPT-2's built offline (the published repo ships none)."""
    if not any((snapshot / name).is_file() for name in TOKENIZER_FILES):
        return gpt2_tokenizer(model_max_length=model.config.n_positions), "GPT-2's (the repo ships no tokenizer)"
    try:
        tokenizer = load_tokenizer(snapshot, model_max_length=model.config.n_positions, config=model.config)
    except ModelLoadError as error:
        log(f"      note: {error}; validating with GPT-2's tokenizer instead")
        return gpt2_tokenizer(model_max_length=model.config.n_positions), "GPT-2's (the repo's does not load " \
            "without its own code, which is never run)"
    return tokenizer, "the repo's files, loaded without trust_remote_code"


def _code_update_description(report: ValidationReport, left_as_is: list[str]) -> str:
    untouched = ("\n\nNot covered by that validation, and left as it is: "
                 + ", ".join(f"`{item}`" for item in left_as_is) + ".") if left_as_is else ""
    return (
        "The repo's model code dates from 2023 and no longer loads on transformers 5 (for instance `AttributeError: "
        "'BackpackGPT2LMHeadModel' object has no attribute 'all_tied_weights_keys'`). This pull request replaces "
        "`configuration_backpack_gpt2.py` and `modeling_backpack_gpt2.py` with those of the checkpoint-compatible "
        "`backpack-gpt2` package (and sets `auto_map` in `config.json` where needed). The weights are untouched.\n\n"
        "Validated before opening it, in a fresh process with `trust_remote_code=True` on the repo's weights and "
        f"configuration beside these two files only: {report.summary()}{untouched}"
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
    api = hub_api()
    if not dry_run:  # fail on the token before downloading the weights
        token = check_token(api, token, repo_id, own_namespace=False)

    log(f"[1/4] Downloading the snapshot of {repo_id} (main)")
    with hub_errors_as_messages(repo_id, f"downloading {repo_id}"):
        snapshot = Path(api.snapshot_download(repo_id, repo_type="model", token=token))
    commit = snapshot.name if COMMIT_OID.fullmatch(snapshot.name) else None
    if not (snapshot / "config.json").is_file():
        raise CheckpointError(f"{repo_id} has no config.json: not a transformers model repo")
    config = read_json(snapshot / "config.json")
    if not is_backpack_config(config):
        raise CheckpointError(f"{repo_id}'s config.json is not a Backpack GPT-2 configuration (model_type "
                              f"{config.get('model_type')!r}, architectures {config.get('architectures')}); "
                              "--update-code proposes the Backpack model code only")
    log(f"      commit {commit or 'unknown'}, {len(list_files(snapshot))} files")

    left_as_is = code_left_as_is(snapshot)
    with staging_folder(staging_dir) as staging:
        log(f"[2/4] Staging the repo's weights and configuration with this package's model code in {staging}")
        changed = stage_code_update(snapshot, staging)
        if not changed:
            log(f"{repo_id} already has this package's model code and auto_map: nothing to propose")
            return None
        if left_as_is:
            log(f"      note: the repo also holds code that this pull request leaves as it is; it is never run here "
                f"and not validated: {', '.join(left_as_is)}")
        log("[3/4] Validating in a fresh process (the repo's weights with the new code, trust_remote_code=True)")
        try:  # the reference: the installed classes on the same weights (the repo's own code is not imported)
            model = load_pretrained_model(snapshot, require_backpack=True)
        except ModelLoadError as error:
            raise CheckpointError(f"{repo_id}: {error}") from error
        tokenizer, tokenizer_source = _reference_tokenizer(snapshot, model, log)
        reference = reference_batch(model, tokenizer)
        with tempfile.TemporaryDirectory(prefix="backpack-tokenizer-") as scratch:
            save_tokenizer_without_code(tokenizer, Path(scratch))
            try:
                report = validate_staging(staging, reference, tokenizer_dir=scratch)
            except ValidationFailed as error:
                raise ValidationFailed(f"validation failed, no pull request was opened: {error}") from error
        log(f"      tokenizer: {tokenizer_source}")
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
                                     commit_description=_code_update_description(report, left_as_is), token=token,
                                     repo_type="model", create_pr=True, parent_commit=commit)
        log(f"Opened pull request: {info.pr_url}")
        log(f'Until it is merged, load it with revision="{info.pr_revision}": AutoModelForCausalLM.from_pretrained('
            f'"{repo_id}", revision="{info.pr_revision}", trust_remote_code=True)')
        return info
