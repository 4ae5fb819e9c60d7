"""Words -> token ids, and the model/tokenizer loading every tool shares.

A word is given either as a string or as a token id. Strings go through the tokenizer with GPT-2's
leading-space convention: ``"bank"`` is encoded as ``" bank"``, the form a word takes in the middle of a sentence
(``Ġbank``), which is the form the paper reads senses of; a string that already starts with a space (``" bank"``)
is taken as written, so it is the same token, not ``"  bank"``. A word that the tokenizer splits into several subwords
is handled the way the paper handles it (lexical similarity, PAPER.md): either by its *first* subword or by the
*average* of its subwords. Every result carries the subwords it used, so printed output can state it.

For interventions (scaling a sense, knowledge edits) the two policies mean: ``"first"`` edits the first subword
only; ``"average"`` edits every subword, which is what scaling the average's sense ℓ by γ amounts to (the average
is linear in the subwords' senses).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

SubwordPolicy = Literal["first", "average"]
SUBWORD_POLICIES: tuple[str, ...] = ("first", "average")
Word = str | int


@dataclass(frozen=True)
class ResolvedWord:
    """A word and the token ids that stand for it.

    Attributes:
        word: What the caller gave (a string or a token id).
        token_ids: Every subword's token id, in order (one id for a single-subword word or a given id).
        subwords: The tokenizer's string for each subword (``"#<id>"`` without a tokenizer).
    """

    word: Word
    token_ids: tuple[int, ...]
    subwords: tuple[str, ...]

    @property
    def is_split(self) -> bool:
        """Whether the tokenizer needed several subwords for this word."""
        return len(self.token_ids) > 1

    def used_ids(self, policy: SubwordPolicy) -> tuple[int, ...]:
        """The token ids `policy` uses: the first subword, or all of them (to be averaged / edited together)."""
        check_policy(policy)
        return self.token_ids[:1] if policy == "first" else self.token_ids

    def describe(self, policy: SubwordPolicy) -> str:
        """How the word was read, for printed output: ``'bank'`` or ``'salesperson' = avg(' sales', 'person')``."""
        if not self.is_split:
            return f"{self.word!r}"
        pieces = ", ".join(repr(s) for s in self.subwords)
        if policy == "first":
            return f"{self.word!r} = first subword {self.subwords[0]!r} of ({pieces})"
        return f"{self.word!r} = avg({pieces})"


def check_policy(policy: str) -> None:
    """ValueError unless `policy` is ``"first"`` or ``"average"``."""
    if policy not in SUBWORD_POLICIES:
        raise ValueError(f"subword policy must be one of {SUBWORD_POLICIES}, got {policy!r}")


def _subword_string(tokenizer, token_id: int) -> str:
    if tokenizer is None:
        return f"#{token_id}"
    return tokenizer.decode([token_id])


def resolve_word(word: Word, tokenizer=None, vocab_size: int | None = None, leading_space: bool = True) -> ResolvedWord:
    """Token ids of one word.

    Args:
        word: A string (encoded as ``" " + word`` when `leading_space` and the string does not start with a space
            already) or a token id (int).
        tokenizer: Needed for strings.
        vocab_size: The model's vocabulary size; ids at or beyond it are rejected.
        leading_space: GPT-2 convention: mid-sentence words carry a leading space.

    Raises:
        ValueError: an empty/blank string, a string the tokenizer cannot encode (no ids, or the unknown token),
            an id outside the vocabulary, or a string without a tokenizer.
    """
    if isinstance(word, bool):  # bool is an int subclass; True is never meant as token id 1
        raise ValueError(f"word must be a string or a token id, got {word!r}")
    if not isinstance(word, str) and hasattr(word, "__index__"):  # int, numpy integer, 0-d integer tensor
        try:
            ids: list[int] = [operator.index(word)]
        except TypeError as error:
            raise ValueError(f"word must be a string or an integer token id, got {word!r}") from error
        word = ids[0]
    elif isinstance(word, str):
        if not word.strip():
            raise ValueError(f"empty word {word!r}: give a non-blank string or a token id")
        if tokenizer is None:
            raise ValueError(f"word {word!r} is a string but no tokenizer was given; pass token ids instead")
        # A word typed with its leading space (" bank") is that mid-sentence form already: adding another space
        # would make it two tokens, ' ' and ' bank'.
        text = " " + word if leading_space and not word.startswith(" ") else word
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        unk = getattr(tokenizer, "unk_token_id", None)
        # GPT-2's unk token is <|endoftext|>, which a real word never encodes to; other tokenizers' unk means unknown.
        if not ids or (unk is not None and unk in ids and unk != getattr(tokenizer, "eos_token_id", None)):
            raise ValueError(f"unknown word {word!r}: the tokenizer has no subwords for it")
    else:
        raise ValueError(f"word must be a string or a token id, got {type(word).__name__} {word!r}")
    for token_id in ids:
        if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
            raise ValueError(f"word {word!r}: token id {token_id} is outside the vocabulary [0, {vocab_size})")
    return ResolvedWord(word, tuple(ids), tuple(_subword_string(tokenizer, i) for i in ids))


def resolve_words(
    words: Iterable[Word], tokenizer=None, vocab_size: int | None = None, leading_space: bool = True
) -> list[ResolvedWord]:
    """[`resolve_word`] for each word; ValueError when no words are given."""
    resolved = [resolve_word(w, tokenizer, vocab_size, leading_space) for w in words]
    if not resolved:
        raise ValueError("no words given")
    return resolved


_TOKEN_ID = re.compile(r"#\s*\+?\d+")
_NUMBER_LIKE = re.compile(r"#\s*[-+.]*\d")


def parse_word_arg(text: str) -> Word:
    """Command-line word: ``#123`` is token id 123, anything else is a string.

    Raises:
        ValueError: for ``#`` followed by something number-like that is not a non-negative integer (``#-5``,
            ``#3.5``, ``#12abc``): meant as a token id, but not a valid one.
    """
    if _TOKEN_ID.fullmatch(text):
        return int(text[1:])
    if _NUMBER_LIKE.match(text):
        raise ValueError(f"invalid token id {text!r}: write #N with N a non-negative integer (e.g. #318)")
    return text


def pool_subwords(per_token: torch.Tensor, words: Sequence[ResolvedWord], policy: SubwordPolicy) -> torch.Tensor:
    """Rows of `per_token` (one per id of ``flat_ids(words)``, any trailing shape) pooled per word.

    (Σ_t ids, ...) -> (n_words, ...): the first subword's row, or the mean over the word's subwords.
    """
    check_policy(policy)
    rows, start = [], 0
    for word in words:
        block = per_token[start:start + len(word.token_ids)]
        rows.append(block[0] if policy == "first" else block.mean(dim=0))
        start += len(word.token_ids)
    return torch.stack(rows)


def flat_ids(words: Sequence[ResolvedWord]) -> list[int]:
    """Every subword id of `words`, concatenated (the row order [`pool_subwords`] expects)."""
    return [i for word in words for i in word.token_ids]


def check_sense_index(sense: int, num_senses: int) -> int:
    """`sense` as an int in [0, num_senses), or ValueError."""
    try:
        if isinstance(sense, bool):
            raise TypeError
        index = operator.index(sense)
    except TypeError as error:
        raise ValueError(f"sense index must be an integer, got {sense!r}") from error
    if not 0 <= index < num_senses:
        raise ValueError(f"sense index {index} is out of range: this model has senses 0..{num_senses - 1}")
    return index


def check_finite(name: str, value: float) -> float:
    """`value` as a float, or ValueError if it is NaN or infinite (or not a number)."""
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a number, got {value!r}") from error
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}")
    return number


def check_finite_tensor(name: str, values: torch.Tensor) -> torch.Tensor:
    """`values` unchanged, or ValueError if any entry is NaN or infinite (a model with corrupt weights, say).

    Printing NaN as a result would look like an answer; the toolkit's entry points call this on what they report.
    """
    if values.is_floating_point() and not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise ValueError(f"{name}: {bad} of {values.numel()} values are NaN or infinite; the model's weights (or "
                         "the sense weights / edits given to it) are not finite")
    return values


def load_model(path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **kwargs):
    """A model folder or Hub id -> (model in eval mode, tokenizer); see [`backpack.loading.load_model`].

    Backpacks load with the installed classes, never with the checkpoint's own code; the folder's own tokenizer is
    used when it has one, otherwise GPT-2's (the Backpack's published tokenizer). `kwargs`: revision, token, ...
    """
    from .loading import load_model as load_by_name_or_path

    return load_by_name_or_path(path, device, dtype, **kwargs)


def senses_eval(model, token_ids: Sequence[int]) -> torch.Tensor:
    """C(x) (n, k, d) for `token_ids` with the sense network in eval mode (no dropout), edits included, no grad."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model.sense_vectors(list(token_ids))
    finally:
        model.train(was_training)
