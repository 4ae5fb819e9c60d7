"""Sense readout: C(x), E·C(x)ℓ, and the words each sense promotes and suppresses (PAPER.md, "Reading a sense").

The contribution of sense ℓ of word x to *every* prediction of the model is E·C(x)[ℓ] (a vector over the
vocabulary), scaled by a non-negative weight α. Its highest and lowest entries therefore describe what the sense
does, in any context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .words import (
    ResolvedWord,
    SubwordPolicy,
    Word,
    check_finite_tensor,
    check_sense_index,
    flat_ids,
    pool_subwords,
    resolve_words,
    senses_eval,
)


def sense_vectors(
    model, words: Sequence[Word], tokenizer=None, policy: SubwordPolicy = "average"
) -> tuple[torch.Tensor, list[ResolvedWord]]:
    """C(x) for each word: (n_words, k, d), pooled over subwords by `policy`, sense edits included.

    Returns the vectors and the resolved words (which subwords were used).
    """
    resolved = resolve_words(words, tokenizer, model.config.vocab_size)
    per_token = senses_eval(model, flat_ids(resolved))  # (Σ subwords, k, d)
    return pool_subwords(per_token, resolved, policy), resolved


def sense_logits(
    model, words: Sequence[Word], tokenizer=None, policy: SubwordPolicy = "average"
) -> tuple[torch.Tensor, list[ResolvedWord]]:
    """E·C(x)[ℓ] for each word and sense: (n_words, k, vocab).

    E is linear, so the logits of averaged senses are the average of the subwords' sense logits.
    """
    vectors, resolved = sense_vectors(model, words, tokenizer, policy)
    with torch.no_grad():
        return model.get_output_embeddings()(vectors), resolved


def readable_vocab_size(model, tokenizer=None) -> int:
    """Ids the tokenizer can print: the model's vocabulary minus GPT-2's padding rows (50257..50263)."""
    size = model.config.vocab_size
    return min(size, len(tokenizer)) if tokenizer is not None else size


@dataclass
class SenseReadout:
    """Top and bottom words of every sense of some words.

    Attributes:
        words: The resolved words (subwords used).
        policy: How several subwords were pooled.
        senses: The sense indices shown.
        top / bottom: ``[word][sense]`` -> list of (token string, logit E_w·C(x)ℓ), best first / most negative first.
        norms: ``(n_words, n_senses)`` Euclidean norm of each C(x)[ℓ].
    """

    words: list[ResolvedWord]
    policy: SubwordPolicy
    senses: list[int]
    top: list[list[list[tuple[str, float]]]]
    bottom: list[list[list[tuple[str, float]]]]
    norms: torch.Tensor


def _token_string(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id]) if tokenizer is not None else f"#{token_id}"


def _ranked(logits: torch.Tensor, count: int, largest: bool, tokenizer) -> list[tuple[str, float]]:
    values, ids = torch.topk(logits, count, largest=largest)
    return [(_token_string(tokenizer, int(i)), float(v)) for v, i in zip(values, ids)]


def read_senses(
    model,
    words: Sequence[Word],
    tokenizer=None,
    top_k: int = 5,
    senses: Sequence[int] | None = None,
    policy: SubwordPolicy = "average",
) -> SenseReadout:
    """The `top_k` highest and lowest words of E·C(x)[ℓ] for every word x and sense ℓ (all senses by default)."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    num_senses = model.config.num_senses
    chosen = list(range(num_senses)) if senses is None else [check_sense_index(s, num_senses) for s in senses]
    vectors, resolved = sense_vectors(model, words, tokenizer, policy)
    with torch.no_grad():
        logits = model.get_output_embeddings()(vectors)[..., : readable_vocab_size(model, tokenizer)]
    check_finite_tensor("the sense logits E·C(x)", logits[:, chosen])
    # More words than the vocabulary has means all of them (the command line says so).
    count = min(top_k, logits.shape[-1])
    top = [[_ranked(logits[w, s], count, True, tokenizer) for s in chosen] for w in range(len(resolved))]
    bottom = [[_ranked(logits[w, s], count, False, tokenizer) for s in chosen] for w in range(len(resolved))]
    return SenseReadout(resolved, policy, chosen, top, bottom, vectors[:, chosen].norm(dim=-1))


def format_readout(readout: SenseReadout, show_bottom: bool = True) -> str:
    """The readout as a plain-text table: one block per word, one row per sense."""
    lines = []
    for w, word in enumerate(readout.words):
        lines.append(f"word {word.describe(readout.policy)}  token ids {list(word.token_ids)}")
        header = f"  {'sense':>5}  {'|C|':>7}  top words (E·C logit)"
        lines.append(header + ("  |  bottom words" if show_bottom else ""))
        for s, sense in enumerate(readout.senses):
            top = ", ".join(f"{t!r} {v:+.2f}" for t, v in readout.top[w][s])
            row = f"  {sense:>5}  {float(readout.norms[w, s]):7.2f}  {top}"
            if show_bottom:
                row += "  |  " + ", ".join(f"{t!r} {v:+.2f}" for t, v in readout.bottom[w][s])
            lines.append(row)
    return "\n".join(lines)
