"""Proposing this package's model code to an existing Backpack repo on the Hub, as one validated pull request.

The repo's snapshot is downloaded, its two code files are replaced by the installed ones (and ``auto_map`` set in
``config.json`` if needed; the weights are only linked, never rewritten), the result is loaded in a fresh process
with ``trust_remote_code=True`` and compared with the installed classes on the same weights, and only then is ONE
pull request opened, based on the commit that was validated.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import CommitOperationAdd

from backpack.loading import TOKENIZER_FILES, ModelLoadError, is_backpack_config, load_model

from .checkpoint import read_json
from .errors import CheckpointError, UsageError, ValidationFailed
from .hub import check_token, hub_api, hub_errors_as_messages, parse_repo_id
from .staging import (
    CODE_MODULES,
    StagedFile,
    auto_map_is_current,
    ensure_auto_map,
    format_file_list,
    list_files,
    staging_folder,
)
from .validation import ValidationReport, reference_batch, validate_staging

CODE_UPDATE_MESSAGE = "Update the model code for transformers 5 (backpack-gpt2 package)"
COMMIT_OID = re.compile(r"[0-9a-f]{40}")


def stage_code_update(snapshot: str | os.PathLike, staging: str | os.PathLike) -> list[StagedFile]:
    """The repo's files with the installed model code swapped in (and ``auto_map`` fixed if needed).

    Only ``config.json`` and the code files are copied (they may be rewritten); every other file, the weights
    included, is linked to the downloaded snapshot, never copied or changed.

    Returns:
        The files that differ from the repo's (what the pull request changes), possibly none.
    """
    snapshot, staging = Path(snapshot), Path(staging)
    if staging.exists() and any(staging.iterdir()):
        raise UsageError(f"--staging-dir {staging} is not empty")
    staging.mkdir(parents=True, exist_ok=True)
    rewritable = {"config.json", *(Path(module.__file__).name for module in CODE_MODULES)}
    for path in sorted(snapshot.rglob("*")):
        relative = path.relative_to(snapshot).as_posix()
        if path.is_dir() or relative.startswith("."):  # .gitattributes stays as it is in the repo
            continue
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if relative in rewritable:
            shutil.copyfile(path, target)  # a file of its own: writing it never touches the Hub cache
        else:
            target.symlink_to(path.resolve())

    changed = []
    for module in CODE_MODULES:
        source = Path(module.__file__)
        target = staging / source.name
        if not target.is_file() or target.read_bytes() != source.read_bytes():
            shutil.copyfile(source, target)
            changed.append(source.name)
    config_path = staging / "config.json"
    if not auto_map_is_current(read_json(config_path)):
        ensure_auto_map(config_path)
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

    with staging_folder(staging_dir) as staging:
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
            has_tokenizer = any((staging / name).is_file() for name in TOKENIZER_FILES)
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
