"""Lexical similarity of sense vectors (PAPER.md, "Lexical similarity"; paper Table 4).

    Sim_ℓ(x, x') = cos(C(x)[ℓ], C(x')[ℓ])          one score per sense ℓ
    Sim_min(x, x') = min_ℓ Sim_ℓ(x, x')
    embedding cosine = cos(E x, E x')              the plain-embedding baseline

Each is compared with human ratings by Spearman's ρ. SimLex-999 and WordSim-353 ship in gensim's wheel;
RG65 and SimVerb-3500 are read from files given by the caller. A word of several subwords is its first subword or
the average of its subwords (the paper reports the better of the two; [`similarity_table`] computes either).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from scipy.stats import spearmanr

from .words import SubwordPolicy, check_policy, flat_ids, pool_subwords, resolve_words, senses_eval

DATASET_ORDER: tuple[str, ...] = ("SimLex999", "SimVerb3500", "RG65", "WordSim353")
"""Table 4's column order."""


def gensim_dataset_path(name: str) -> str:
    """Path of ``simlex999.txt`` / ``wordsim353.tsv`` inside gensim's test data."""
    import gensim

    path = os.path.join(os.path.dirname(gensim.__file__), "test", "test_data", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name} is not in this gensim installation ({path})")
    return path


def builtin_datasets() -> dict[str, str]:
    """The datasets available without any download: SimLex999 and WordSim353 from gensim."""
    return {"SimLex999": gensim_dataset_path("simlex999.txt"), "WordSim353": gensim_dataset_path("wordsim353.tsv")}


_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


def load_pairs(path: str) -> list[tuple[str, str, float]]:
    """(word, word, human score) triples from a ratings file.

    Accepts the usual layouts: ``w1 w2 score`` separated by tabs, spaces, commas or semicolons (SimLex, WordSim,
    RG65), and SimVerb-3500's ``w1 w2 POS score relation``: the score is the first number after the two words.
    Lines starting with ``#`` and header lines without a number are skipped.
    """
    if not os.path.isfile(path):
        raise ValueError(f"similarity file {path!r} does not exist")
    pairs = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = [f for f in re.split(r"[\t,;]+|\s+", line) if f]
            if len(fields) < 3:
                continue
            score = next((float(f) for f in fields[2:] if _NUMBER.match(f)), None)
            if score is None:
                continue  # a header
            pairs.append((fields[0], fields[1], score))
    if not pairs:
        raise ValueError(f"no (word, word, score) lines found in {path!r}")
    return pairs


@dataclass
class SimilarityResult:
    """Spearman ρ of each method on one dataset. `methods` maps "Sim0".."Sim{k-1}", "Sim_min", "embedding"."""

    dataset: str
    pairs: int
    split_words: int
    methods: dict[str, float]


def pair_similarities(model, tokenizer, pairs: Sequence[tuple[str, str, float]], policy: SubwordPolicy = "average"
                      ) -> dict[str, torch.Tensor]:
    """Every method's similarity for every pair: {"Sim0": (pairs,), ..., "Sim_min": (pairs,), "embedding": ...}."""
    check_policy(policy)
    vocabulary = sorted({w for a, b, _ in pairs for w in (a, b)})
    resolved = resolve_words(vocabulary, tokenizer, model.config.vocab_size)
    index = {word: i for i, word in enumerate(vocabulary)}
    ids = flat_ids(resolved)
    senses = pool_subwords(senses_eval(model, ids).float(), resolved, policy)  # (words, k, d)
    with torch.no_grad():
        embeddings = pool_subwords(model.get_input_embeddings().weight[ids].float(), resolved, policy)  # (words, d)
    left = torch.tensor([index[a] for a, _, _ in pairs])
    right = torch.tensor([index[b] for _, b, _ in pairs])
    per_sense = torch.cosine_similarity(senses[left], senses[right], dim=-1)  # (pairs, k)
    result = {f"Sim{sense}": per_sense[:, sense] for sense in range(per_sense.shape[1])}
    result["Sim_min"] = per_sense.min(dim=-1).values
    result["embedding"] = torch.cosine_similarity(embeddings[left], embeddings[right], dim=-1)
    return result


def evaluate_similarity(model, tokenizer, name: str, pairs: Sequence[tuple[str, str, float]],
                        policy: SubwordPolicy = "average") -> SimilarityResult:
    """Spearman ρ between each method's similarities and the human scores."""
    human = [score for _, _, score in pairs]
    similarities = pair_similarities(model, tokenizer, pairs, policy)
    methods = {method: float(spearmanr(values.numpy(), human).statistic) for method, values in similarities.items()}
    words = {w for a, b, _ in pairs for w in (a, b)}
    split = sum(len(tokenizer.encode(" " + w, add_special_tokens=False)) > 1 for w in words)
    return SimilarityResult(name, len(pairs), split, methods)


def similarity_table(model, tokenizer, datasets: dict[str, str] | None = None, policy: SubwordPolicy = "average"
                     ) -> list[SimilarityResult]:
    """Table 4 for `model`: every method on every dataset ({name: path}; gensim's two by default), in Table 4 order."""
    datasets = dict(builtin_datasets() if datasets is None else datasets)
    order = [n for n in DATASET_ORDER if n in datasets] + [n for n in datasets if n not in DATASET_ORDER]
    return [evaluate_similarity(model, tokenizer, name, load_pairs(datasets[name]), policy) for name in order]


def format_similarity_table(results: Sequence[SimilarityResult], policy: SubwordPolicy, model_name: str = "model"
                            ) -> str:
    """Rows Sim0..Sim{k-1}, Sim_min, embeddings; columns the datasets (Spearman ρ); best Sim_ℓ marked with *."""
    names = [r.dataset for r in results]
    methods = list(results[0].methods)
    best = {r.dataset: max((v, m) for m, v in r.methods.items() if m.startswith("Sim") and m != "Sim_min")[1]
            for r in results}
    header = f"| {'method (' + model_name + ')':<28} | " + " | ".join(f"{n:>11}" for n in names) + " |"
    lines = [
        "Spearman correlation; several-subword words: "
        + ("average of subwords" if policy == "average" else "first subword"),
        header,
        "|" + "-" * 30 + "|" + "|".join("-" * 13 for _ in names) + "|",
    ]
    for method in methods:
        label = "embedding cosine (E x)" if method == "embedding" else method
        cells = [f"{r.methods[method]:>10.3f}{'*' if best[r.dataset] == method else ' '}" for r in results]
        lines.append(f"| {label:<28} | " + " | ".join(cells) + " |")
    lines.append("pairs: " + ", ".join(f"{r.dataset} {r.pairs} ({r.split_words} words split into subwords)"
                                       for r in results))
    return "\n".join(lines)
