"""Token ids to benchmark on: real text by default.

The Backpack computes its sense network once per *distinct* token of a batch, and real text repeats tokens
(a 8 x 512 batch of Wikipedia has about 1,450 distinct ids) while uniformly random ids barely do, so random ids
would overstate the Backpack's cost. The texts are the ones gensim ships for its own tests, so no download, read by
`backpack.corpora` exactly as the trainer's embedded corpus reads them.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from backpack.corpora import lee_documents, wikipedia_articles
from configuration_backpack_gpt2 import GPT2_END_OF_TEXT, GPT2_VOCAB_SIZE

DATA_SOURCES = ("wiki", "lee", "embedded", "random")


def _texts(source: str) -> Iterator[str]:
    """The documents of a real-text source; "embedded" is the trainer's offline corpus (Wikipedia, then Lee)."""
    if source in ("wiki", "embedded"):
        yield from (text for _title, text in wikipedia_articles())
    if source in ("lee", "embedded"):
        yield from lee_documents()


def token_stream(source: str, min_tokens: int, vocab_size: int, seed: int = 0) -> torch.LongTensor:
    """At least `min_tokens` GPT-2 token ids of `source` ("wiki", "lee", "embedded" or "random"), as one 1-D tensor.

    Texts are joined with blank lines and cycled if the corpus is shorter than asked.
    """
    if source == "random":
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, min(vocab_size, GPT2_VOCAB_SIZE), (min_tokens,), generator=generator)
    if source not in DATA_SOURCES:
        raise ValueError(f"unknown data source {source!r}; choose from {DATA_SOURCES}")
    from backpack.tokenizer import gpt2_tokenizer

    tokenizer = gpt2_tokenizer(model_max_length=10**9)
    ids: list[int] = []
    while len(ids) < min_tokens:
        before = len(ids)
        for text in _texts(source):
            ids.extend(tokenizer(text + "\n\n")["input_ids"])
            if len(ids) >= min_tokens:
                break
        if len(ids) == before:
            raise RuntimeError(f"corpus {source!r} produced no tokens")
    return torch.tensor(ids[:min_tokens], dtype=torch.long)


def packed_blocks(source: str, block_size: int, vocab_size: int, seed: int = 0,
                  min_blocks: int = 1) -> np.ndarray:
    """A corpus packed as the trainer packs it: ``EOS doc EOS doc ...`` cut into blocks of `block_size` tokens that
    overlap by one, the last padded with -100 (`backpack_train.data.pack_documents`): (blocks, block_size).
    "random" gives `min_blocks` blocks of uniform ids.

    The trainer's micro-batches are random blocks of this array (its data order shuffles them).
    """
    if source == "random":
        generator = np.random.default_rng(seed)
        return generator.integers(0, min(vocab_size, GPT2_VOCAB_SIZE), (max(min_blocks, 1), block_size))
    if source not in DATA_SOURCES:
        raise ValueError(f"unknown data source {source!r}; choose from {DATA_SOURCES}")
    from backpack.tokenizer import gpt2_tokenizer
    from backpack_train.data import pack_documents

    tokenizer = gpt2_tokenizer(model_max_length=10**9)
    documents = tokenizer(list(_texts(source)), add_special_tokens=False, verbose=False)["input_ids"]
    return np.array(pack_documents(documents, GPT2_END_OF_TEXT, block_size), dtype=np.int64)  # padding: PAD_TOKEN


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
