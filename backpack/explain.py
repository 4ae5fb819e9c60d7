"""Explain a prediction: the exact additive decomposition of a logit into (context word, sense) contributions.

A Backpack's logit of word w at position i is

    logit_w(i) = E_w · o_i = Σ_{j ≤ i} Σ_ℓ α[ℓ, i, j] (E_w · C(x_j)[ℓ])

(no final LayerNorm, no bias), so contribution[ℓ, j] = α[ℓ,i,j]·(E_w·C(x_j)[ℓ]) sums exactly to the logit, and

    log p(w | x_≤i) = Σ_{ℓ,j} contribution[ℓ, j] − log Σ_v exp(logit_v(i))

With a contrast word w', E_w is replaced by E_w − E_w' and the sum is logit_w − logit_w' = log p(w) − log p(w'),
a decomposition of the log-probability ratio with no normaliser left over.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .words import ResolvedWord, Word, check_finite_tensor, resolve_word


@dataclass
class Explanation:
    """One prediction, decomposed.

    Attributes:
        tokens: The context's tokens as strings, (n,).
        input_ids: (n,) token ids.
        position: The query position i (0-based); the prediction is of token i + 1.
        target / contrast: The explained word (and the word it is contrasted with), resolved.
        target_id / contrast_id: The token predicted: the first subword of a several-subword word.
        contributions: (k, i + 1): α[ℓ,i,j]·((E_w − E_w')·C(x_j)[ℓ]); sums to `value`.
        contextualization: α, (k, n, n).
        value: The model's own logit_w(i) (or logit_w − logit_w'), from its forward pass.
        log_partition: log Σ_v exp(logit_v(i)), so log p(w) = logit_w − log_partition.
        log_prob: log p(w | x_≤i) (or log p(w) − log p(w') with a contrast).
    """

    tokens: list[str]
    input_ids: torch.Tensor
    position: int
    target: ResolvedWord
    target_id: int
    contrast: ResolvedWord | None
    contrast_id: int | None
    contributions: torch.Tensor
    contextualization: torch.Tensor
    value: float
    log_partition: float
    log_prob: float

    @property
    def total(self) -> float:
        """Σ contributions (equals `value` up to float rounding)."""
        return float(self.contributions.sum())

    def top(self, count: int = 10, by_magnitude: bool = True) -> list[tuple[int, str, int, float]]:
        """The largest contributions as (position j, token, sense ℓ, contribution), largest |value| first."""
        flat = self.contributions.flatten()
        order = torch.argsort(flat.abs() if by_magnitude else flat, descending=True)[:count]
        width = self.contributions.shape[1]
        return [(int(o) % width, self.tokens[int(o) % width], int(o) // width, float(flat[o])) for o in order]


def encode_text(text: str | Sequence[int] | torch.Tensor, tokenizer=None, vocab_size: int | None = None
                ) -> torch.Tensor:
    """A context as (n,) token ids: a string through the tokenizer (as is, no added space), or ids as given."""
    if isinstance(text, str):
        if not text.strip():
            raise ValueError("empty text: nothing to explain")
        if tokenizer is None:
            raise ValueError("text given as a string but no tokenizer")
        ids = torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)
    else:
        ids = torch.as_tensor(list(text) if not isinstance(text, torch.Tensor) else text, dtype=torch.long).flatten()
    if ids.numel() == 0:
        raise ValueError("empty context: nothing to explain")
    if vocab_size is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"context has token ids outside the vocabulary [0, {vocab_size})")
    return ids


def _position(position: int, length: int) -> int:
    index = position + length if position < 0 else position
    if not 0 <= index < length:
        raise ValueError(f"position {position} is out of range for a context of {length} tokens")
    return index


def forward_with_parts(model, input_ids: torch.Tensor, **kwargs):
    """One eval-mode forward returning logits, α (batch, k, n, n) and senses (batch, k, n, d)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(input_ids, output_contextualization=True, output_senses=True, use_cache=False, **kwargs)
    finally:
        model.train(was_training)


def explain_prediction(
    model,
    text: str | Sequence[int] | torch.Tensor,
    target: Word,
    position: int = -1,
    tokenizer=None,
    contrast: Word | None = None,
) -> Explanation:
    """Decompose logit_w at `position` of `text` into α[ℓ,i,j]·(E_w·C(x_j)[ℓ]) for every j ≤ i and sense ℓ.

    `target` / `contrast` are words (strings get GPT-2's leading space; a several-subword word is predicted by its
    first subword, which is what the next-token distribution can score) or token ids.
    """
    vocab = model.config.vocab_size
    ids = encode_text(text, tokenizer, vocab)
    i = _position(position, ids.numel())
    target_word = resolve_word(target, tokenizer, vocab)
    contrast_word = resolve_word(contrast, tokenizer, vocab) if contrast is not None else None
    target_id = target_word.token_ids[0]
    contrast_id = contrast_word.token_ids[0] if contrast_word is not None else None

    out = forward_with_parts(model, ids[None].to(model.device))
    check_finite_tensor(f"the model's logits at position {i}", out.logits[0, i])
    alpha = check_finite_tensor("the contextualization weights α", out.contextualization[0].float())  # (k, n, n)
    senses = check_finite_tensor("the sense vectors of the context", out.senses[0].float())  # (k, n, d)
    embedding = model.get_output_embeddings().weight.detach().float()
    direction = embedding[target_id] - (embedding[contrast_id] if contrast_id is not None else 0.0)  # (d,)
    # contribution[ℓ, j] = α[ℓ, i, j] · (direction · C(x_j)[ℓ]), j ≤ i.
    contributions = alpha[:, i, : i + 1] * (senses[:, : i + 1] @ direction)
    logits = out.logits[0, i].float()
    log_partition = float(torch.logsumexp(logits, dim=-1))
    value = float(logits[target_id] - (logits[contrast_id] if contrast_id is not None else 0.0))
    log_prob = value if contrast_id is not None else value - log_partition
    tokens = [tokenizer.decode([int(t)]) if tokenizer is not None else f"#{int(t)}" for t in ids]
    return Explanation(tokens, ids, i, target_word, target_id, contrast_word, contrast_id, contributions.cpu(),
                       alpha.cpu(), value, log_partition, log_prob)


def format_explanation(explanation: Explanation, count: int = 10) -> str:
    """The top contributors as a plain-text table, with the check that they sum to the model's logit."""
    e = explanation
    what = f"logit({e.target.describe('first')})"
    if e.target.is_split:
        what += f" [predicted as its first subword {e.target.subwords[0]!r}]"
    if e.contrast is not None:
        what += f" - logit({e.contrast.describe('first')})"
    context = "".join(e.tokens[: e.position + 1])
    lines = [
        f"context up to position {e.position}: {context!r} -> next token",
        f"{what} = {e.value:+.4f};  sum of {e.contributions.numel()} (word, sense) contributions = {e.total:+.4f}"
        f"  (|difference| {abs(e.value - e.total):.2e})",
        (f"log p ratio = {e.log_prob:+.4f}" if e.contrast is not None else
         f"log p = logit - logsumexp(logits) = {e.value:+.4f} - {e.log_partition:.4f} = {e.log_prob:+.4f}"),
        f"{'rank':>4}  {'pos':>3}  {'word':<16} {'sense':>5}  {'alpha':>7}  {'contribution':>12}",
    ]
    for rank, (j, token, sense, value) in enumerate(e.top(count), start=1):
        alpha = float(e.contextualization[sense, e.position, j])
        lines.append(f"{rank:>4}  {j:>3}  {token!r:<16} {sense:>5}  {alpha:7.4f}  {value:+12.4f}")
    return "\n".join(lines)
