"""Backpack GPT-2 toolkit: tokenizer, sense readout, explanations, interventions and evaluations.

Importing the package needs only the core install (torch, transformers). Tools whose libraries come with an extra
are attributes resolved on first use (module ``__getattr__``), and using one without its extra raises an
ImportError that names the extra: ``similarity_table`` needs ``pip install 'backpack-gpt2[eval]'`` (scipy, gensim),
and so does ``backpack.plots`` (matplotlib).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# The model module registers the Backpack with transformers' Auto classes and `pipeline` when imported: after
# `import backpack`, `AutoModelForCausalLM.from_pretrained(folder)` builds a Backpack without remote code.
import modeling_backpack_gpt2  # noqa: F401

from ._optional import MissingExtraError
from .bias import BiasReport, evaluate_bias
from .explain import Explanation, explain_prediction
from .interventions import (
    Intervention,
    active_interventions,
    knowledge_edit,
    predicted_scale_effect,
    remove_all_interventions,
    scale_sense,
    zero_sense,
)
from .senses import SenseReadout, read_senses, sense_logits, sense_vectors
from .tokenizer import gpt2_tokenizer
from .topic import TOPIC_BAGS, TopicController, bag_token_ids
from .words import ResolvedWord, load_model, resolve_word

if TYPE_CHECKING:
    from .similarity import SimilarityResult, similarity_table

# name -> submodule: imported on first access, so that `import backpack` never loads the extras' libraries.
_LAZY_ATTRIBUTES = {"SimilarityResult": "similarity", "similarity_table": "similarity"}


def __getattr__(name: str):
    if name in _LAZY_ATTRIBUTES:
        value = getattr(importlib.import_module(f".{_LAZY_ATTRIBUTES[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_ATTRIBUTES))


__all__ = [
    "TOPIC_BAGS",
    "BiasReport",
    "Explanation",
    "Intervention",
    "MissingExtraError",
    "ResolvedWord",
    "SenseReadout",
    "SimilarityResult",
    "TopicController",
    "active_interventions",
    "bag_token_ids",
    "evaluate_bias",
    "explain_prediction",
    "gpt2_tokenizer",
    "knowledge_edit",
    "load_model",
    "predicted_scale_effect",
    "read_senses",
    "remove_all_interventions",
    "resolve_word",
    "scale_sense",
    "sense_logits",
    "sense_vectors",
    "similarity_table",
    "zero_sense",
]
