"""Optional dependencies: imported when a tool that needs them is used, with an install hint naming the extra.

``pip install -e .`` gives the model files, the tokenizer, loading, generation and every toolkit function that only
needs torch and transformers (senses, explanations, interventions, topic control, bias). Lexical similarity and
figures need the ``eval`` extra (scipy, gensim, matplotlib); the browser demo needs ``demo`` (gradio, matplotlib).
"""

from __future__ import annotations

import importlib
from types import ModuleType

DISTRIBUTION = "backpack-gpt2"

OPTIONAL_LIBRARIES: dict[str, str] = {"scipy": "eval", "gensim": "eval", "matplotlib": "eval"}
"""Top-level module -> the extra of ``setup.py`` that installs it (the tests check that setup.py agrees)."""


class MissingExtraError(ImportError):
    """A tool was used whose library is not installed; the message says which extra installs it.

    Attributes:
        extra: The ``setup.py`` extra that provides the missing library (``"eval"``, ``"demo"``, ...).
    """

    def __init__(self, message: str, extra: str, name: str | None = None):
        super().__init__(message, name=name)
        self.extra = extra


def install_hint(extra: str) -> str:
    """The pip command that installs `extra`: ``pip install 'backpack-gpt2[eval]'``."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def import_optional(module: str, purpose: str) -> ModuleType:
    """Import `module` (e.g. ``"scipy.stats"``), or raise [`MissingExtraError`] naming its extra and `purpose`.

    Args:
        module: The module to import; its top-level package must be in `OPTIONAL_LIBRARIES`.
        purpose: What needs it, for the message ("lexical similarity (Spearman's rho)").
    """
    extra = OPTIONAL_LIBRARIES[module.split(".")[0]]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        # `error.name` is the module that is really absent: the library itself, or one of its own dependencies
        # (installing the extra brings both).
        missing = (error.name or module).split(".")[0]
        raise MissingExtraError(
            f"{purpose} needs the `{missing}` package, which is not installed: {install_hint(extra)}",
            extra=extra,
            name=missing,
        ) from error
