"""Lexical similarity of sense vectors (PAPER.md, "Lexical similarity"; paper Table 4).

    Sim_ℓ(x, x') = cos(C(x)[ℓ], C(x')[ℓ])          one score per sense ℓ
    Sim_min(x, x') = min_ℓ Sim_ℓ(x, x')
    embedding cosine = cos(E x, E x')              the plain-embedding baseline

Each is compared with human ratings by Spearman's ρ. SimLex-999 and WordSim-353 ship in gensim's wheel;
RG65 and SimVerb-3500 are read from files given by the caller. A word of several subwords is its first subword or
the average of its subwords (the paper reports the better of the two; [`similarity_table`] computes either).

Spearman's ρ comes from scipy and the built-in files from gensim: both come with ``pip install 'backpack-gpt2[eval]'``
and are imported when used.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ._optional import import_optional
from .corpora import gensim_test_file
from .words import SubwordPolicy, check_finite_tensor, check_policy, flat_ids, pool_subwords, resolve_words, senses_eval

DATASET_ORDER: tuple[str, ...] = ("SimLex999", "SimVerb3500", "RG65", "WordSim353")
"""Table 4's column order."""


def builtin_datasets() -> dict[str, str]:
    """The datasets available without any download: SimLex999 and WordSim353 from gensim."""
    return {"SimLex999": gensim_test_file("simlex999.txt"), "WordSim353": gensim_test_file("wordsim353.tsv")}


MIN_PAIRS = 3
"""Fewest pairs a ratings file may hold: Spearman's ρ of two pairs is always ±1."""


def _read_lines(path: str) -> list[str]:
    """The file's lines, decoded as UTF-8; ValueError naming the file and line of the first undecodable byte."""
    if os.path.isdir(path):
        raise ValueError(f"similarity file {path!r} is a folder; expected a ratings file (word word score lines)")
    if not os.path.exists(path):
        raise ValueError(f"similarity file {path!r} does not exist")
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise ValueError(f"can't read similarity file {path!r}: {error.strerror or error}") from error
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {data[error.start]:#04x}); is this a ratings file?"
                         ) from error


def _number(text: str) -> float | None:
    """`text` as a float (NaN and infinities included, so that they can be refused by name), or None."""
    try:
        return float(text)
    except ValueError:
        return None


def load_pairs(path: str) -> list[tuple[str, str, float]]:
    """(word, word, human score) triples from a ratings file.

    Accepts the usual layouts: ``w1 w2 score [...]`` separated by tabs, spaces, commas or semicolons (SimLex,
    WordSim, RG65), and SimLex's / SimVerb-3500's ``w1 w2 POS score [...]``: the score is the third field, or the
    fourth when the third is not a number. Blank lines and lines starting with ``#`` are skipped, and so is a first
    line without a score (a header).

    Raises:
        ValueError: naming the file and line: a missing file, bytes that are not UTF-8, a line that is not two
            words and a score, a score that is NaN or infinite; fewer than `MIN_PAIRS` pairs; scores all equal
            (Spearman's ρ is then undefined).
    """
    pairs = []
    seen_content = False
    for number, raw in enumerate(_read_lines(path), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        # Tabs, commas or semicolons separate fields when the line has any (a header's "Word 1" stays one field);
        # otherwise runs of spaces do.
        separator = r"\s*[\t,;]+\s*" if re.search(r"[\t,;]", line) else r"\s+"
        fields = [f for f in re.split(separator, line) if f]
        candidates = fields[2:3] if len(fields) > 2 and _number(fields[2]) is not None else fields[3:4]
        score_text = next((f for f in candidates if _number(f) is not None), None)
        first_line, seen_content = not seen_content, True
        if score_text is None:
            if first_line and all(_number(f) is None for f in fields):
                continue  # a header such as "word1 word2 score"
            raise ValueError(f"{path}:{number}: expected 'word word score' (or 'word word POS score'), got "
                             f"{line[:80]!r}")
        score = float(score_text)
        if not math.isfinite(score):
            raise ValueError(f"{path}:{number}: the score {score_text!r} is not a finite number")
        pairs.append((fields[0], fields[1], score))
    if not pairs:
        raise ValueError(f"no (word, word, score) lines found in {path!r}")
    if len(pairs) < MIN_PAIRS:
        raise ValueError(f"{path!r} has {len(pairs)} (word, word, score) line(s); Spearman's rho needs at least "
                         f"{MIN_PAIRS}")
    if len({score for _, _, score in pairs}) == 1:
        raise ValueError(f"all {len(pairs)} scores in {path!r} are equal ({pairs[0][2]:g}): Spearman's rho is "
                         "undefined")
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
    check_finite_tensor("the sense vectors of the rated words", senses)
    check_finite_tensor("the word embeddings of the rated words", embeddings)
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
    spearmanr = import_optional("scipy.stats", "lexical similarity (Spearman's rho)").spearmanr
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
    return [evaluate_similarity(model, tokenizer, name, load_pairs(datasets[name]), policy)
            for name in ordered_datasets(datasets)]


def ordered_datasets(names: Iterable[str]) -> list[str]:
    """Dataset names in Table 4's column order, unknown names last (in the given order)."""
    names = list(names)
    return [n for n in DATASET_ORDER if n in names] + [n for n in names if n not in DATASET_ORDER]


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
