"""Token ids to benchmark on: real text by default.

The Backpack computes its sense network once per *distinct* token of a batch, and real text repeats tokens
(a 8 x 512 batch of Wikipedia has about 1,450 distinct ids) while uniformly random ids barely do, so random ids
would overstate the Backpack's cost. The texts are the ones gensim ships for its own tests, so no download, read by
`backpack.corpora` exactly as the trainer's embedded corpus reads them.
"""

from __future__ import annotations

import torch

from backpack.corpora import lee_documents, wikipedia_articles

DATA_SOURCES = ("wiki", "lee", "random")


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
        texts = (text for _title, text in wikipedia_articles()) if source == "wiki" else lee_documents()
        for text in texts:
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
