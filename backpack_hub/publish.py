"""Publishing a checkpoint: read it, stage the repo, validate it in a fresh process, push it as one commit."""

from __future__ import annotations

import os
from collections.abc import Callable

from backpack.loading import count_parameters

from .checkpoint import Checkpoint, load_checkpoint, load_tokenizer
from .errors import ValidationFailed
from .hub import check_token, hub_api, parse_repo_id, push_staging
from .staging import format_file_list, stage, staging_folder
from .validation import reference_batch, validate_staging


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
    api = hub_api()
    if not dry_run:  # fail on the token before minutes of staging and validation
        token = check_token(api, token, repo_id)

    log(f"[1/4] Reading checkpoint {folder}")
    checkpoint = load_checkpoint(folder)
    log(f"      {checkpoint.kind} checkpoint, {count_parameters(checkpoint.model):,} parameters"
        + (f", step {checkpoint.step:,}" if checkpoint.step is not None else "")
        + (f", run record {checkpoint.run_file}" if checkpoint.run_file else ", no run record found"))
    with staging_folder(staging_dir) as staging:
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
