"""Topic-controlled generation (PAPER.md, "Topic control"; paper §6.1 and appendix D.1).

1. A topic is a bag of words b (many-hot over the vocabulary). Every (word x, sense ℓ) gets the score

       s(x, ℓ) = b · (E C(x)[ℓ]) / max_v (E C(x)[ℓ])_v                                    (vocab, k)

2. The 0.95 / 0.80 / 0.60 quantiles of s split the pairs into 4 groups with weights δ:
   strength 1 -> 1.5, 1.5, 1.3, 1;  2 -> 2.2, 2.2, 1.5, 1;  3 -> 3.3, 3.3, 3, 1  (0 -> all 1: plain generation).
3. Generation computes o_i = Σ_j Σ_ℓ α[ℓ,i,j] δ[ℓ,i,j] C(x_j)[ℓ] through the model's `sense_weights` callable; the
   cache keeps the senses unweighted and δ re-weights the sum at every step.
4. Annealing, so that a sense that has already produced its words stops pushing:
       a[ℓ, j] = Σ_{generated x_g} max(E_{x_g} · C(x_j)[ℓ], 0)
       b[ℓ, j] = sigmoid(−a f + 6) (1 + j/100),   f = 7.5 / max δ
       δ̃ = b δ + (1 − b) 1   (computed as 1 + b (δ − 1), which is exactly 1 where δ = 1)
   with j the key's position in the (possibly left-padded) sequence, 0-based.

Computing max_v(E C(x)[ℓ]) for *every* word costs vocab² · k · d (hours on a CPU for GPT-2's vocabulary), so the
quantiles are estimated from the scores of a random sample of words (`sample_size`, 4096 by default; None = all
words, exact); the scores of the words that actually occur in a context are always exact.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .words import check_finite, check_finite_tensor, senses_eval

TOPIC_BAGS: dict[str, tuple[str, ...]] = {
    "arts_culture": ("arts", "culture"),
    "business_entrepreneurs": ("business", "entrepreneurs"),
    "celebrity_pop_culture": ("celebrity", "pop", "culture"),
    "diaries_daily_life": ("diaries", "daily", "life"),
    "family": ("family",),
    "fashion_style": ("fashion", "style"),
    "film_tv_video": ("film", "tv", "video"),
    "fitness_health": ("fitness", "health"),
    "food_dining": ("food", "dining"),
    "gaming": ("gaming",),
    "music": ("music",),
    "news_social_concern": ("news", "social", "concern"),
    "other_hobbies": ("hobbies",),
    "relationships": ("relationships",),
    "sports": ("sports",),
    "travel_adventure": ("travel", "adventure"),
    "youth_student_life": ("youth", "student", "life"),
}
"""The paper's 17 topic bags (Table 10)."""

STRENGTH_DELTAS: dict[int, tuple[float, float, float, float]] = {
    0: (1.0, 1.0, 1.0, 1.0),
    1: (1.5, 1.5, 1.3, 1.0),
    2: (2.2, 2.2, 1.5, 1.0),
    3: (3.3, 3.3, 3.0, 1.0),
}
"""δ for the groups [≥ q0.95, [q0.80, q0.95), [q0.60, q0.80), < q0.60] at each strength."""

QUANTILES: tuple[float, float, float] = (0.95, 0.80, 0.60)


def bag_token_ids(words: Sequence[str | int], tokenizer=None, vocab_size: int | None = None) -> list[int]:
    """The many-hot bag b as token ids.

    A string word contributes each of its forms " word", "word", " Word", "Word" that is a single token (so
    "music" marks ``Ġmusic``, ``music``, ``ĠMusic``, ``Music``); a word none of whose forms is a single token
    contributes the first subword of " word". Ints are token ids.
    """
    ids: dict[int, None] = {}
    for word in words:
        if isinstance(word, int) and not isinstance(word, bool):
            ids[word] = None
            continue
        if not isinstance(word, str) or not word.strip():
            raise ValueError(f"empty or invalid bag word {word!r}")
        if tokenizer is None:
            raise ValueError(f"bag word {word!r} is a string but no tokenizer was given")
        word = word.strip()
        forms = dict.fromkeys((" " + word, word, " " + word[:1].upper() + word[1:], word[:1].upper() + word[1:]))
        encoded = [tokenizer.encode(form, add_special_tokens=False) for form in forms]
        singles = [e[0] for e in encoded if len(e) == 1]
        if not singles and not encoded[0]:
            raise ValueError(f"unknown bag word {word!r}")
        for token_id in singles or encoded[0][:1]:
            ids[token_id] = None
    result = list(ids)
    if not result:
        raise ValueError("empty bag of words")
    for token_id in result:
        if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
            raise ValueError(f"bag token id {token_id} is outside the vocabulary [0, {vocab_size})")
    return result


def topic_scores(model, bag_ids: Sequence[int], token_ids: Sequence[int] | torch.Tensor, chunk: int = 64,
                 progress: bool = False) -> torch.Tensor:
    """s(x, ℓ) = b·(E C(x)[ℓ]) / max_v (E C(x)[ℓ])_v for the given words: (n,) -> (n, k), float32.

    b·(E c) = (bᵀE)·c is cheap; the max needs the full sense logits, computed `chunk` words at a time.
    """
    ids = torch.as_tensor(list(token_ids) if not isinstance(token_ids, torch.Tensor) else token_ids).flatten()
    embedding = model.get_output_embeddings().weight.detach().float()  # (V, d)
    bag_direction = embedding[torch.as_tensor(list(bag_ids), dtype=torch.long)].sum(dim=0)  # bᵀE, (d,)
    scores = []
    starts = range(0, ids.numel(), chunk)
    for start in tqdm(starts, desc="topic scores", disable=not progress or len(starts) < 2):
        senses = senses_eval(model, ids[start:start + chunk].tolist()).float()  # (n, k, d)
        with torch.no_grad():
            peak = (senses @ embedding.T).amax(dim=-1)  # (n, k)
        # A max of exactly 0 would divide by zero; such a sense promotes nothing, so its score is 0.
        scores.append((senses @ bag_direction) / torch.where(peak == 0, torch.ones_like(peak), peak))
    return torch.cat(scores)


def topic_thresholds(model, bag_ids: Sequence[int], sample_size: int | None = 4096, seed: int = 0,
                     progress: bool = True) -> torch.Tensor:
    """The 0.95, 0.80, 0.60 quantiles of s over (word, sense) pairs: (3,).

    Exact over the whole vocabulary when `sample_size` is None or at least the vocabulary size; otherwise over
    a seeded random sample of `sample_size` words (plus the bag words themselves).
    """
    vocab = model.config.vocab_size
    if sample_size is None or sample_size >= vocab:
        ids = torch.arange(vocab)
    else:
        if sample_size < 1:
            raise ValueError(f"sample_size must be >= 1, got {sample_size}")
        generator = torch.Generator().manual_seed(seed)
        ids = torch.unique(torch.cat([torch.randperm(vocab, generator=generator)[:sample_size],
                                      torch.as_tensor(list(bag_ids))]))
    scores = check_finite_tensor("the topic scores s(x, ℓ)", topic_scores(model, bag_ids, ids, progress=progress))
    return torch.quantile(scores.flatten().double(), torch.tensor(QUANTILES, dtype=torch.float64)).float()


def delta_groups(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Group index per score: 0 (≥ q0.95), 1 ([q0.80, q0.95)), 2 ([q0.60, q0.80)), 3 (below q0.60). Same shape."""
    return 3 - (scores[..., None] >= thresholds.to(scores)).sum(dim=-1)


def check_strength(strength: int) -> int:
    """`strength` as one of the paper's levels 0..3, or ValueError."""
    if isinstance(strength, bool) or int(check_finite("strength", strength)) != strength or strength not in \
            STRENGTH_DELTAS:
        raise ValueError(f"topic strength must be one of {sorted(STRENGTH_DELTAS)}, got {strength!r}")
    return int(strength)


class TopicController:
    """δ for `model.generate(..., sense_weights=controller)` or `model(..., sense_weights=controller)`.

    Called as `controller(input_ids_new (batch, q), past_length) -> δ (batch, k, past_length + q)`. It keeps a
    running record of the sequence: a call with past_length 0 starts a new one (the prompt), and every later call
    appends the new tokens, which count as generated (for annealing). Use one controller per `generate()` call at a
    time, with greedy search or sampling: beam search reorders rows without telling the callable.

    Args:
        model: The Backpack (senses are read with its current sense edits).
        bag_ids: The topic's token ids ([`bag_token_ids`]).
        strength: 0..3 (0 = plain generation).
        anneal: Apply the annealing rule.
        sample_size / seed: How the quantiles are estimated ([`topic_thresholds`]).
        thresholds: Precomputed quantiles (3,), to share them across strengths.
    """

    def __init__(self, model, bag_ids: Sequence[int], strength: int = 2, anneal: bool = True,
                 sample_size: int | None = 4096, seed: int = 0, thresholds: torch.Tensor | None = None,
                 progress: bool = True):
        self.model = model
        self.bag_ids = list(bag_ids)
        if not self.bag_ids:
            raise ValueError("empty bag of words")
        self.strength = check_strength(strength)
        self.anneal = anneal
        self.deltas = torch.tensor(STRENGTH_DELTAS[self.strength])
        self.f = 7.5 / float(self.deltas.max())
        if thresholds is None and self.strength > 0:
            thresholds = topic_thresholds(model, self.bag_ids, sample_size, seed, progress)
        elif thresholds is not None:
            thresholds = check_finite_tensor("thresholds", torch.as_tensor(thresholds, dtype=torch.float32))
        self.thresholds = thresholds
        self._delta_cache: dict[int, torch.Tensor] = {}
        self.reset()

    def reset(self) -> None:
        """Forget the recorded sequence."""
        self.input_ids: torch.Tensor | None = None  # (batch, T)
        self.prompt_length = 0
        self._senses: torch.Tensor | None = None  # (batch, T, k, d), for annealing

    def word_deltas(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Un-annealed δ of each (word, sense): (n,) -> (n, k), exact scores, cached per word."""
        k = self.model.config.num_senses
        if self.strength == 0:
            return torch.ones(token_ids.numel(), k)
        missing = [t for t in dict.fromkeys(token_ids.tolist()) if t not in self._delta_cache]
        if missing:
            groups = delta_groups(topic_scores(self.model, self.bag_ids, missing), self.thresholds)
            for token_id, row in zip(missing, self.deltas[groups]):
                self._delta_cache[token_id] = row
        return torch.stack([self._delta_cache[t] for t in token_ids.tolist()])

    def _record(self, input_ids: torch.Tensor, past_length: int) -> None:
        new_ids = input_ids.detach().cpu().long()
        if past_length == 0:
            self.reset()
            self.input_ids, self.prompt_length = new_ids, new_ids.shape[1]
        else:
            rows, recorded = (0, 0) if self.input_ids is None else tuple(self.input_ids.shape)
            if recorded != past_length or rows != new_ids.shape[0]:
                raise RuntimeError(
                    f"TopicController recorded {recorded} tokens x {rows}"
                    f" rows but the model continues from {past_length} tokens x {new_ids.shape[0]} rows; use one "
                    "controller per generate() call (greedy or sampling, not beam search)"
                )
            self.input_ids = torch.cat([self.input_ids, new_ids], dim=1)
        if self.anneal and self.strength > 0:
            senses = senses_eval(self.model, new_ids.flatten().tolist()).float().cpu()
            senses = senses.view(*new_ids.shape, *senses.shape[1:])
            self._senses = senses if self._senses is None else torch.cat([self._senses, senses], dim=1)

    def annealing(self) -> torch.Tensor:
        """b[batch, ℓ, j] = sigmoid(−a f + 6)(1 + j/100), a = Σ_generated max(E_{x_g}·C(x_j)[ℓ], 0): (batch, k, T)."""
        batch, length = self.input_ids.shape
        generated = self.input_ids[:, self.prompt_length:]  # (batch, G)
        embedding = self.model.get_output_embeddings().weight.detach().float().cpu()
        if generated.shape[1]:
            sense_logits = torch.einsum("btkd,bgd->bktg", self._senses, embedding[generated])  # (batch, k, T, G)
            a = sense_logits.clamp(min=0).sum(dim=-1)
        else:
            a = torch.zeros(batch, self.model.config.num_senses, length)
        position = torch.arange(length, dtype=torch.float32)
        return torch.sigmoid(-a * self.f + 6) * (1 + position / 100)

    def __call__(self, input_ids: torch.Tensor, past_length: int) -> torch.Tensor:
        self._record(input_ids, past_length)
        batch, length = self.input_ids.shape
        delta = self.word_deltas(self.input_ids.flatten()).view(batch, length, -1).transpose(1, 2)  # (batch, k, T)
        if self.anneal and self.strength > 0:
            delta = 1 + self.annealing() * (delta - 1)
        return delta.to(input_ids.device)


@dataclass
class Generation:
    """A generated text: the prompt's ids, the new ids, and the decoded continuation.

    `max_new_tokens` is the limit that was used: the one asked for, or less when the prompt left fewer of the
    model's `n_positions` free (callers compare it with what they asked for, to say so).
    """

    prompt_ids: torch.Tensor
    new_ids: torch.Tensor
    text: str
    max_new_tokens: int


def check_sampling(top_p: float, temperature: float) -> tuple[float, float]:
    """(top_p, temperature) as floats, or ValueError: top_p must be in (0, 1] and temperature > 0, both finite."""
    top_p = check_finite("top_p", top_p)
    temperature = check_finite("temperature", temperature)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p:g}")
    if temperature <= 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature:g}")
    return top_p, temperature


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 40, controller: TopicController | None = None,
             do_sample: bool = True, top_p: float = 0.9, temperature: float = 1.0, seed: int = 0) -> Generation:
    """`model.generate` on one prompt, topic-controlled when a controller is given (works with the cache).

    At most `max_new_tokens` tokens: fewer when the prompt leaves less room in the model's `n_positions` (the
    result's `max_new_tokens` is the limit used). An empty or blank prompt, a prompt that fills every position,
    or non-finite sampling settings are a ValueError.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"empty prompt {prompt!r}: give some text to continue")
    if isinstance(max_new_tokens, bool) or not hasattr(max_new_tokens, "__index__") or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if do_sample:
        top_p, temperature = check_sampling(top_p, temperature)
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)], device=model.device)
    if ids.numel() == 0:
        raise ValueError(f"prompt {prompt!r} encodes to no tokens")
    room = model.config.n_positions - ids.shape[1]
    if room < 1:
        raise ValueError(f"prompt of {ids.shape[1]} tokens leaves no room in n_positions={model.config.n_positions}")
    kwargs = {"do_sample": do_sample}
    if do_sample:
        kwargs.update(top_p=top_p, temperature=temperature, top_k=0)
    if controller is not None:
        kwargs["sense_weights"] = controller
    torch.manual_seed(seed)
    limit = min(operator.index(max_new_tokens), room)
    with torch.no_grad():
        output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=limit,
                                pad_token_id=tokenizer.eos_token_id, **kwargs)
    new_ids = output[0, ids.shape[1]:].cpu()
    return Generation(ids[0].cpu(), new_ids, tokenizer.decode(new_ids), limit)


def bag_mass(model, input_ids: torch.Tensor, bag_ids: Sequence[int], sense_weights=None) -> float:
    """Mean over positions of Σ_{w ∈ bag} p(w | x_≤i), teacher-forced, under optional `sense_weights`."""
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    if ids.numel() == 0:
        raise ValueError(f"empty input of shape {tuple(ids.shape)}: no positions to score")
    if isinstance(sense_weights, torch.Tensor):
        check_finite_tensor("sense_weights", sense_weights)
    with torch.no_grad():
        logits = model(ids.to(model.device), sense_weights=sense_weights, use_cache=False).logits.float()
    check_finite_tensor("the model's logits", logits)
    probs = torch.softmax(logits, dim=-1)[..., list(bag_ids)].sum(dim=-1)
    return float(probs.mean())
