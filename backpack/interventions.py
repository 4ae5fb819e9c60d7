"""Interventions on sense vectors: scale or zero sense ℓ of a word, and the paper's knowledge edit (PAPER.md §6.3).

Every intervention replaces a word's senses C(x) -> C̃(x) through the model's `set_sense_edit`, so it acts in every
context: in `forward`, under the KV cache (for tokens processed after it is applied, so apply it before
generating) and in `generate()` / `pipeline`. Because o_i = Σ_j Σ_ℓ α[ℓ,i,j] C(x_j)[ℓ] and α does not depend on the
senses, the effect is exactly known: scaling sense ℓ of x by γ changes position i's logits by

    Δlogits_i = Σ_{j ≤ i, x_j = x} (γ − 1) α[ℓ, i, j] E·C(x)[ℓ]                          (vocab,)

(see [`predicted_scale_effect`]).

Interventions stack: each one transforms the senses left by the ones before it, and removing any of them (in any
order) recomputes the rest from the senses the word had before the toolkit first touched it, so removing all of
them restores the previous model exactly (bit for bit: the previous edit, or no edit at all).

    with scale_sense(model, "bank", sense=3, gamma=0.0, tokenizer=tok):   # context manager
        model.generate(...)
    edit = knowledge_edit(model, "MacBook", "Apple", "HP", tokenizer=tok)  # persistent until edit.remove()
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .words import (
    ResolvedWord,
    SubwordPolicy,
    Word,
    check_finite,
    check_finite_tensor,
    check_policy,
    check_sense_index,
    pool_subwords,
    resolve_word,
    resolve_words,
    senses_eval,
)

_REGISTRY_ATTRIBUTE = "_backpack_toolkit_interventions"


@dataclass
class _Registry:
    """Per-model bookkeeping: each touched token's state before the toolkit, and the active interventions."""

    base_senses: dict[int, torch.Tensor] = field(default_factory=dict)  # C(x) before any toolkit intervention
    base_edits: dict[int, torch.Tensor | None] = field(default_factory=dict)  # the model's own edit then, if any
    active: list[Intervention] = field(default_factory=list)


def _registry(model) -> _Registry:
    registry = getattr(model, _REGISTRY_ATTRIBUTE, None)
    if registry is None:
        registry = _Registry()
        object.__setattr__(model, _REGISTRY_ATTRIBUTE, registry)  # plain attribute, not an nn.Module child
    return registry


class Intervention(ABC):
    """A change of some words' senses, active from construction until [`remove`] (or the end of a `with` block).

    Subclasses define `transform(token_id, senses (k, d)) -> (k, d)`.
    """

    description: str = "intervention"

    def __init__(self, model, token_ids: Sequence[int]):
        self.model = model
        self.token_ids = tuple(dict.fromkeys(int(t) for t in token_ids))
        self.active = False

    @abstractmethod
    def transform(self, token_id: int, senses: torch.Tensor) -> torch.Tensor:
        """The new (k, d) senses of `token_id`, given its current ones."""

    def apply(self) -> Intervention:
        """Activate (done on construction); no-op if already active."""
        if self.active:
            return self
        registry = _registry(self.model)
        edits = self.model.backpack.sense_edits
        for token_id in self.token_ids:
            if token_id not in registry.base_senses:
                registry.base_edits[token_id] = edits[token_id].clone() if token_id in edits else None
                registry.base_senses[token_id] = senses_eval(self.model, [token_id])[0].clone()
        registry.active.append(self)
        self.active = True
        _recompute(self.model, self.token_ids)
        return self

    def remove(self) -> None:
        """Deactivate; the words' senses become what the remaining interventions make of them."""
        if not self.active:
            return
        registry = _registry(self.model)
        registry.active.remove(self)
        self.active = False
        _recompute(self.model, self.token_ids)

    def __enter__(self) -> Intervention:
        return self.apply()

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description} ({'active' if self.active else 'removed'})>"


def _recompute(model, token_ids: Sequence[int]) -> None:
    """Re-derive the edits of `token_ids` from their base state through the active interventions, in order."""
    registry = _registry(model)
    for token_id in token_ids:
        chain = [i for i in registry.active if token_id in i.token_ids]
        if not chain:
            base_edit = registry.base_edits.pop(token_id)
            registry.base_senses.pop(token_id)
            if base_edit is None:
                model.remove_sense_edits([token_id])
            else:
                model.backpack.sense_edits[token_id] = base_edit  # the very tensor set before: exact restore
            continue
        senses = registry.base_senses[token_id]
        for intervention in chain:
            senses = intervention.transform(token_id, senses)
        model.set_sense_edit(token_id, senses)


class SenseScale(Intervention):
    """C̃(x)[ℓ] = γ·C(x)[ℓ] for sense ℓ of every word in `token_ids`; the other senses are unchanged."""

    def __init__(self, model, token_ids: Sequence[int], sense: int, gamma: float, description: str = ""):
        super().__init__(model, token_ids)
        self.sense = check_sense_index(sense, model.config.num_senses)
        self.gamma = check_finite("scale gamma", gamma)
        self.description = description or f"sense {self.sense} of {list(self.token_ids)} x {self.gamma:g}"

    def transform(self, token_id: int, senses: torch.Tensor) -> torch.Tensor:
        scaled = senses.clone()
        scaled[self.sense] = senses[self.sense] * self.gamma
        return scaled


class KnowledgeEdit(Intervention):
    """Move the x_r component of x's senses onto x_a (PAPER.md §6.3):

        C̃(x)[ℓ] = C(x)[ℓ] + (C(x)[ℓ]·e_r / ‖e_r‖²) (e_a / φ − e_r),   φ = ‖e_a‖² / ‖e_r‖²

    with e_r = E x_r and e_a = E x_a (d,). The component β e_r of each sense along e_r is removed and β·e_a/φ added,
    so C̃(x)[ℓ] − (β/φ) e_a has no component along e_r.
    """

    def __init__(self, model, token_ids: Sequence[int], removed: torch.Tensor, added: torch.Tensor,
                 description: str = ""):
        super().__init__(model, token_ids)
        self.removed = check_finite_tensor("the removed word's embedding", removed.detach().float())
        self.added = check_finite_tensor("the added word's embedding", added.detach().float())
        removed_norm2 = self.removed.pow(2).sum()
        added_norm2 = self.added.pow(2).sum()
        if removed_norm2 == 0 or added_norm2 == 0:
            raise ValueError("knowledge edit needs non-zero embeddings for the removed and the added word")
        self.phi = float(added_norm2 / removed_norm2)
        self.description = description or f"knowledge edit of {list(self.token_ids)}"

    def transform(self, token_id: int, senses: torch.Tensor) -> torch.Tensor:
        return knowledge_edit_senses(senses, self.removed, self.added)


def knowledge_edit_senses(senses: torch.Tensor, removed: torch.Tensor, added: torch.Tensor) -> torch.Tensor:
    """C̃[ℓ] = C[ℓ] + (C[ℓ]·e_r/‖e_r‖²)(e_a/φ − e_r), φ = ‖e_a‖²/‖e_r‖². Shapes: (k, d), (d,), (d,) -> (k, d)."""
    e_r, e_a = removed.to(senses), added.to(senses)
    phi = e_a.pow(2).sum() / e_r.pow(2).sum()
    beta = senses @ e_r / e_r.pow(2).sum()  # (k,) component of each sense along e_r
    return senses + beta[:, None] * (e_a / phi - e_r)[None, :]


# --- constructors ------------------------------------------------------------------------------------------


def _edited_ids(word: ResolvedWord, policy: SubwordPolicy) -> tuple[int, ...]:
    return word.used_ids(policy)


def scale_sense(
    model,
    words: Word | Sequence[Word],
    sense: int,
    gamma: float,
    tokenizer=None,
    policy: SubwordPolicy = "average",
) -> SenseScale:
    """Scale sense ℓ of each word by γ in every context; returns the active intervention (also a context manager).

    A word of several subwords: ``policy="average"`` scales the sense of every subword (the average's sense ℓ is
    then scaled by exactly γ), ``"first"`` only the first subword's.
    """
    check_policy(policy)
    word_list = [words] if isinstance(words, str | int) else list(words)
    resolved = resolve_words(word_list, tokenizer, model.config.vocab_size)
    ids = [i for word in resolved for i in _edited_ids(word, policy)]
    names = ", ".join(word.describe(policy) for word in resolved)
    return SenseScale(model, ids, sense, gamma, description=f"sense {sense} of {names} x {float(gamma):g}").apply()


def zero_sense(model, words: Word | Sequence[Word], sense: int, tokenizer=None,
               policy: SubwordPolicy = "average") -> SenseScale:
    """Remove sense ℓ of each word (γ = 0) in every context."""
    return scale_sense(model, words, sense, 0.0, tokenizer, policy)


def _embedding(model, word: ResolvedWord, policy: SubwordPolicy) -> torch.Tensor:
    """E x (d,), pooled over subwords by `policy`."""
    with torch.no_grad():
        rows = model.get_input_embeddings().weight[list(word.token_ids)]
    return pool_subwords(rows, [word], policy)[0]


def knowledge_edit(
    model,
    word: Word,
    removed: Word,
    added: Word,
    tokenizer=None,
    policy: SubwordPolicy = "average",
) -> KnowledgeEdit:
    """Move `removed`'s component of `word`'s senses onto `added` (e.g. MacBook: Apple -> HP), in every context.

    E x_r and E x_a of several-subword words are pooled by `policy`; the edit applies to every subword of `word`
    (``"average"``) or its first (``"first"``).
    """
    check_policy(policy)
    vocab = model.config.vocab_size
    target, old, new = (resolve_word(w, tokenizer, vocab) for w in (word, removed, added))
    description = (f"knowledge edit of {target.describe(policy)}: {old.describe(policy)} -> "
                   f"{new.describe(policy)}")
    return KnowledgeEdit(model, _edited_ids(target, policy), _embedding(model, old, policy),
                         _embedding(model, new, policy), description).apply()


def active_interventions(model) -> list[Intervention]:
    """The toolkit interventions active on `model`, oldest first."""
    return list(_registry(model).active)


def remove_all_interventions(model) -> None:
    """Remove every toolkit intervention (newest first); edits set outside the toolkit are restored as they were."""
    for intervention in reversed(active_interventions(model)):
        intervention.remove()


# --- the exact effect --------------------------------------------------------------------------------------


def predicted_scale_effect(
    contextualization: torch.Tensor,
    senses: torch.Tensor,
    output_embeddings: torch.Tensor,
    input_ids: torch.Tensor,
    token_ids: Sequence[int],
    sense: int,
    gamma: float,
) -> torch.Tensor:
    """Δlogits_i = Σ_{j: x_j ∈ token_ids} (γ − 1) α[ℓ,i,j] E·C(x_j)[ℓ], from an unmodified forward pass.

    Shapes: α (batch, k, query, key), senses (batch, k, key, d) (``output_senses``), E (vocab, d),
    input_ids (batch, key) -> (batch, query, vocab).
    """
    gamma = check_finite("scale gamma", gamma)
    hit = torch.isin(input_ids, torch.as_tensor(list(token_ids), device=input_ids.device)).to(senses.dtype)
    with torch.no_grad():
        weights = contextualization[:, sense] * hit[:, None, :]  # (batch, query, key)
        moved = torch.matmul(weights, senses[:, sense])  # (batch, query, d): Σ_j α[ℓ,i,j] C(x_j)[ℓ]
        return (gamma - 1.0) * moved @ output_embeddings.T
