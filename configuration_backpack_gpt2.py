"""Configuration of Backpack GPT-2 (Hewitt, Thickstun, Manning, Liang, "Backpack Language Models", ACL 2023).

A Backpack GPT-2 is a GPT-2 Transformer (the *contextualization network*) plus a *sense network*. Its
configuration is therefore GPT-2's, with two additions: the number of sense vectors per word and the width of
the sense network's final feed-forward layer.

Everything this package saves says ``"model_type": "backpack-gpt2"``, so that transformers refuses such a folder
without ``trust_remote_code=True`` (or the installed classes) instead of silently building a random GPT-2 from it.
The published checkpoint ``stanfordnlp/backpack-gpt2`` predates that and stores ``"model_type": "gpt2"`` with an
``auto_map`` pointing at this file; it is read as a Backpack all the same.
"""

import os
from typing import Any

from transformers import AutoConfig, GPT2Config

BACKPACK_MODEL_TYPE = "backpack-gpt2"
# GPT-2's vocabulary: 50,257 subwords, the last of them <|endoftext|> (its start and end of text), padded with 7
# unused rows to 50,264 (a multiple of 8) in the published Backpack.
GPT2_END_OF_TEXT = 50256
GPT2_VOCAB_SIZE = 50257
GPT2_PADDED_VOCAB_SIZE = 50264
BACKPACK_NAMES = ("BackpackGPT2LMHeadModel", "BackpackGPT2Model", "BackpackGPT2Config", "modeling_backpack_gpt2",
                  "configuration_backpack_gpt2")


def is_backpack_config(config_dict: dict) -> bool:
    """Whether a raw ``config.json`` describes a Backpack GPT-2, read without running any of its code.

    True for ``"model_type": "backpack-gpt2"`` (what this package saves), and for ``"model_type": "gpt2"`` whose
    ``architectures`` or ``auto_map`` name the Backpack classes or modules (the published checkpoint).
    """
    model_type = config_dict.get("model_type")
    if model_type == BACKPACK_MODEL_TYPE:
        return True
    if model_type != "gpt2":
        return False
    auto_map = config_dict.get("auto_map") or {}
    named = [*(config_dict.get("architectures") or []), *(auto_map.values() if isinstance(auto_map, dict) else [])]
    return any(backpack_name in str(name) for name in named for backpack_name in BACKPACK_NAMES)


# The one registry of model sizes: the paper's Table 9 (micro, mini, small; 16 senses, 512 positions) and nano, a
# CPU-sized Backpack for the offline quickstart. The trainer's configs, the benchmark and the Hub tool all read it.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "nano": {"n_embd": 128, "n_layer": 4, "n_head": 4, "n_positions": 128},
    "micro": {"n_embd": 384, "n_layer": 6, "n_head": 6, "n_positions": 512},  # 40M parameters (GPT-2 twin: 30M)
    "mini": {"n_embd": 640, "n_layer": 8, "n_head": 8, "n_positions": 512},  # 100M (70M)
    "small": {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 512},  # 170M (124M), the published size
}
# Sizes for smoke runs and tests only, which no trainer config names: tiny is nano with 2 layers and 2 heads.
TEST_SIZES: dict[str, dict[str, int]] = {
    "tiny": {**MODEL_SIZES["nano"], "n_layer": 2, "n_head": 2},
}


def check_shape(n_embd: int, n_head: int, num_senses: int | None = None) -> None:
    """Refuse a shape whose widths do not split: every attention head (and every sense head) gets
    `n_embd / n_head` (`n_embd / num_senses`) dimensions. `num_senses=None`: a plain GPT-2, no sense heads.

    Raises:
        ValueError: naming the width and the divisor that does not divide it.
    """
    divisors = (("num_senses", num_senses), ("n_head", n_head)) if num_senses is not None else (("n_head", n_head),)
    for name, divisor in divisors:
        if divisor < 1 or n_embd % divisor:
            raise ValueError(
                f"n_embd ({n_embd}) must be divisible by {name} ({divisor}): every sense head and every "
                f"attention head gets n_embd / {name} dimensions."
            )


class BackpackGPT2Config(GPT2Config):
    """Configuration of [`BackpackGPT2LMHeadModel`].

    Args:
        num_senses (`int`, defaults to 16):
            Number of sense vectors `k` per vocabulary word, and number of heads of the contextualization layer.
            `n_embd` must be divisible by it (each head has size `n_embd / num_senses`).
        sense_intermediate_scale (`int`, defaults to 4):
            The sense network's last feed-forward layer maps `n_embd -> sense_intermediate_scale * n_embd ->
            num_senses * n_embd`.
        vocab_size (`int`, defaults to `GPT2_PADDED_VOCAB_SIZE`, 50264):
            GPT-2's 50,257 subwords padded to a multiple of 8, as published.
        n_positions (`int`, defaults to 512):
            Longest sequence the model can read.
        scale_attn_by_inverse_layer_idx (`bool`, defaults to `True`):
            As in the published training configuration.
        bos_token_id, eos_token_id (`int`, *optional*):
            GPT-2's <|endoftext|> (50256) when the vocabulary has it, otherwise none unless given.
        kwargs:
            Every other [`~transformers.GPT2Config`] argument (`n_embd`, `n_layer`, `n_head`, dropouts, ...).

    Raises:
        ValueError: if `n_embd` is not divisible by `num_senses` or by `n_head`, or `tie_word_embeddings=False` (the
            output layer is the input embedding by construction).
    """

    model_type = BACKPACK_MODEL_TYPE

    def __init__(
        self,
        vocab_size: int = GPT2_PADDED_VOCAB_SIZE,
        n_positions: int = 512,
        num_senses: int = 16,
        sense_intermediate_scale: int = 4,
        scale_attn_by_inverse_layer_idx: bool = True,
        **kwargs,
    ):
        self.num_senses = num_senses
        self.sense_intermediate_scale = sense_intermediate_scale
        # GPT-2's <|endoftext|> starts and ends text by default only where the vocabulary has it: a smaller one (a
        # tokenizer of one's own) names its own tokens, or has none.
        for name in ("bos_token_id", "eos_token_id"):
            kwargs.setdefault(name, GPT2_END_OF_TEXT if vocab_size > GPT2_END_OF_TEXT else None)
        super().__init__(
            vocab_size=vocab_size,
            n_positions=n_positions,
            scale_attn_by_inverse_layer_idx=scale_attn_by_inverse_layer_idx,
            **kwargs,
        )
        check_shape(self.n_embd, self.n_head, self.num_senses)
        if self.sense_intermediate_scale < 1:
            raise ValueError(f"sense_intermediate_scale must be >= 1, got {self.sense_intermediate_scale}")
        if not self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings must be True: a Backpack's logits are E o, with E its own input "
                             "embedding (the paper's tied output layer)")

    @classmethod
    def from_size(cls, size: str, **overrides) -> "BackpackGPT2Config":
        """The configuration of a named size of `MODEL_SIZES` or `TEST_SIZES` (16 senses, GPT-2's padded vocabulary
        unless overridden), `overrides` (any argument of this class) on top."""
        sizes = {**MODEL_SIZES, **TEST_SIZES}
        if size not in sizes:
            raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(sizes)}")
        return cls(**{**sizes[size], **overrides})

    def contextualization_config(self) -> GPT2Config:
        """The plain GPT-2 of this Backpack's contextualization network: the Transformer it is compared with."""
        gpt2 = GPT2Config(**{key: value for key, value in self.to_dict().items()
                              if key not in ("num_senses", "sense_intermediate_scale", "auto_map", "architectures",
                                             "model_type", "transformers_version")})
        gpt2._attn_implementation = self._attn_implementation
        return gpt2

    @classmethod
    def get_config_dict(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The raw config, with the published checkpoint's ``"model_type": "gpt2"`` read as this class's type."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == "gpt2" and is_backpack_config(config_dict):
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs


# `save_pretrained` then writes `auto_map["AutoConfig"]` so that a saved folder loads with trust_remote_code=True.
BackpackGPT2Config.register_for_auto_class()
# Once this module is imported, AutoConfig knows the type too (no remote code needed where the package is installed).
AutoConfig.register(BackpackGPT2Config.model_type, BackpackGPT2Config, exist_ok=True)
