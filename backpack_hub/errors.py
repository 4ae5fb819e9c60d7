"""The errors of publishing to the Hub: one class per cause, each with the command's exit code.

Every message says what went wrong and what to do; ``hub_upload.py`` prints it and exits with ``exit_code``.
"""

from __future__ import annotations


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
