"""Talking to the Hub: repo ids, the token check, the push as one commit, and HfApi's errors as the tool's."""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token
from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors

from .errors import (
    AuthenticationError,
    HubUnreachable,
    HubUploadError,
    PermissionDenied,
    RepoMismatch,
    UsageError,
)
from .staging import STALE_WEIGHT_PATTERN, list_files


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


def hub_api() -> HfApi:
    """One HfApi per process, so that its whoami cache spares the rate-limited endpoint at every save point."""
    global _API
    if _API is None:
        _API = HfApi()
    return _API
