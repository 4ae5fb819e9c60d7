"""Token ids to benchmark on: real text by default.

The Backpack computes its sense network once per *distinct* token of a batch, and real text repeats tokens
(a 8 x 512 batch of Wikipedia has about 1,450 distinct ids) while uniformly random ids barely do, so random ids
would overstate the Backpack's cost. The texts are the ones gensim ships for its own tests, so no download.
"""

from __future__ import annotations

import bz2
import os
from collections.abc import Iterator

import torch

WIKI_SAMPLE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_SAMPLE = "lee_background.cor"
DATA_SOURCES = ("wiki", "lee", "random")


def gensim_test_file(name: str) -> str:
    """Path of a file in gensim's shipped test data."""
    try:
        import gensim
    except ImportError as error:
        raise ImportError("real-text benchmarks need gensim's shipped samples: pip install gensim "
                          "(or pass --data random)") from error
    path = os.path.join(os.path.dirname(gensim.__file__), "test", "test_data", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"gensim test file missing: {path}")
    return path


def wiki_texts(min_chars: int = 2000) -> Iterator[str]:
    """Plain text of the articles in gensim's Wikipedia dump sample (redirects and stubs skipped)."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    with bz2.open(gensim_test_file(WIKI_SAMPLE), "rb") as dump:
        for _title, markup, _page_id in extract_pages(dump):
            text = filter_wiki(markup).strip()
            if len(text) >= min_chars:
                yield text


def lee_texts() -> Iterator[str]:
    """The Lee background corpus (news articles, one per line)."""
    with open(gensim_test_file(LEE_SAMPLE), encoding="utf-8", errors="replace") as corpus:
        yield from (line.strip() for line in corpus if line.strip())


def token_stream(source: str, min_tokens: int, vocab_size: int, seed: int = 0) -> torch.LongTensor:
    """At least `min_tokens` GPT-2 token ids of `source` ("wiki", "lee" or "random"), as one 1-D tensor.

    Texts are joined with blank lines and cycled if the corpus is shorter than asked.
    """
    if source == "random":
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, min(vocab_size, 50257), (min_tokens,), generator=generator)
    if source not in DATA_SOURCES:
        raise ValueError(f"unknown data source {source!r}; choose from {DATA_SOURCES}")
    from backpack.tokenizer import gpt2_tokenizer

    tokenizer = gpt2_tokenizer(model_max_length=10**9)
    ids: list[int] = []
    while len(ids) < min_tokens:
        before = len(ids)
        for text in wiki_texts() if source == "wiki" else lee_texts():
            ids.extend(tokenizer(text + "\n\n")["input_ids"])
            if len(ids) >= min_tokens:
                break
        if len(ids) == before:
            raise RuntimeError(f"corpus {source!r} produced no tokens")
    return torch.tensor(ids[:min_tokens], dtype=torch.long)


class TokenBatches:
    """Consecutive (batch, seq) windows of one token stream, as a language-model training loader would cut them."""

    def __init__(self, source: str, min_tokens: int, vocab_size: int, seed: int = 0):
        self.source = source
        self.stream = token_stream(source, min_tokens, vocab_size, seed)

    def batch(self, batch: int, seq: int, offset: int = 0) -> torch.LongTensor:
        """Token ids (batch, seq) starting `offset` tokens into the stream (wrapping around)."""
        need = batch * seq
        index = (torch.arange(need) + offset) % self.stream.numel()
        return self.stream[index].view(batch, seq)

    def distinct_fraction(self, batch: int, seq: int) -> float:
        """Share of a batch's tokens that are distinct: the part of the sense network a batch really computes."""
        ids = self.batch(batch, seq)
        return ids.unique().numel() / ids.numel()
