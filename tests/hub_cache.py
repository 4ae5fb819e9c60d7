"""A Hugging Face Hub cache built by hand, for testing loading by Hub id offline (HF_HUB_OFFLINE=1, HF_HUB_CACHE).

The layout is huggingface_hub's: ``models--OWNER--NAME/blobs/<hash>`` holds the contents,
``snapshots/<commit>/<file>`` are relative symlinks to the blobs and ``refs/<revision>`` names the commit.
The published repo's code files are replaced by stand-ins that record their import in a marker file and then
raise, as the 2023 ``modeling_backpack_gpt2.py`` does on transformers 5: a loader that runs the repo's code fails,
and the marker shows that it tried even if the error was swallowed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

PUBLISHED_ID = "stanfordnlp/backpack-gpt2"
CODE_FILES = ("configuration_backpack_gpt2.py", "modeling_backpack_gpt2.py")


def stand_in_code(marker: Path, name: str) -> bytes:
    """A code file that appends its name to `marker` when imported, then fails like the 2023 code on transformers 5."""
    return (
        f'"""Stand-in for the Hub repo\'s 2023 {name}: importing it is running the repo\'s code."""\n'
        f"with open({str(marker)!r}, 'a') as handle:\n"
        f"    handle.write({name!r} + '\\n')\n"
        "raise AttributeError(\"'BackpackGPT2LMHeadModel' object has no attribute 'all_tied_weights_keys' \"\n"
        "                     \"(stand-in for the published 2023 remote code)\")\n"
    ).encode()


def add_to_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes | Path], *, revision: str = "main",
                     commit: str | None = None) -> Path:
    """Put `files` (name -> contents or a file to copy) into `cache` as `repo_id` at `revision`; returns the snapshot.

    The commit hash defaults to one derived from the contents, so that two revisions with different files differ.
    """
    contents = {name: value.read_bytes() if isinstance(value, Path) else value for name, value in files.items()}
    digest = hashlib.sha1()
    for name in sorted(contents):
        digest.update(name.encode() + b"\0" + hashlib.sha256(contents[name]).digest())
    commit = commit or digest.hexdigest()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for name, data in contents.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs" / revision).write_text(commit)
    return snapshot


def publish_with_stand_in_code(cache: Path, repo_id: str, folder: Path, marker: Path) -> Path:
    """`folder`'s files (config + weights) as `repo_id` in `cache`, beside stand-in code files that fail on import."""
    files: dict[str, bytes | Path] = {path.name: path for path in sorted(folder.iterdir())
                                      if path.is_file() and path.name not in CODE_FILES and path.suffix != ".pt"}
    files.update({name: stand_in_code(marker, name) for name in CODE_FILES})
    return add_to_hub_cache(cache, repo_id, files)
