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
that loads it until it is merged. None of the repo's own code runs: the folder validated holds only its weights and
configuration beside the two installed files, the tokenizer loads without remote code, and any other code the repo
holds (``custom_generate/``, a tokenizer ``auto_map``) is named as left as it is and not validated.

From Python (``train/pretrain.py --push_to_hub`` calls this, on the main process only)::

    from backpack_hub import push_checkpoint
    url = push_checkpoint("outputs/nano/model", "me/backpack-nano", private=True)

The work is done by the ``backpack_hub`` package (checkpoint reading, model card, staging, fresh-process validation,
Hub push and errors, code update); this file is only its command line.

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
import sys

from backpack_hub.code_update import update_code
from backpack_hub.errors import HubUploadError
from backpack_hub.publish import push_checkpoint
from backpack_hub.staging import check_staging_dir


def _shard_size(text: str) -> str | int:
    """argparse type: ``2GB``, ``500MB``, ``2GiB`` (an integer and a unit) or a number of bytes."""
    from transformers.utils.hub import convert_file_size_to_int

    text = text.strip()
    try:
        size = int(text) if text.isdigit() else convert_file_size_to_int(text)
    except (ValueError, TypeError) as error:
        raise argparse.ArgumentTypeError(f"expected a size such as 2GB, 500MB or a number of bytes, got {text!r}"
                                         ) from error
    if size <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return size if text.isdigit() else text


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
    parser.add_argument("--max-shard-size", default="2GB", metavar="SIZE", type=_shard_size,
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
        if args.staging_dir is not None:  # before any download or staging
            check_staging_dir(args.staging_dir)
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
