"""Configuration of Backpack GPT-2 (Hewitt, Thickstun, Manning, Liang, "Backpack Language Models", ACL 2023).

A Backpack GPT-2 is a GPT-2 Transformer (the *contextualization network*) plus a *sense network*. Its
configuration is therefore GPT-2's, with two additions: the number of sense vectors per word and the width of
the sense network's final feed-forward layer.

The published checkpoint ``stanfordnlp/backpack-gpt2`` stores ``"model_type": "gpt2"`` and an ``auto_map``
pointing at this file, so this class keeps GPT-2's model type: the published ``config.json`` loads unchanged.
"""

from transformers import GPT2Config


class BackpackGPT2Config(GPT2Config):
    """Configuration of [`BackpackGPT2LMHeadModel`].

    Args:
        num_senses (`int`, defaults to 16):
            Number of sense vectors `k` per vocabulary word, and number of heads of the contextualization layer.
            `n_embd` must be divisible by it (each head has size `n_embd / num_senses`).
        sense_intermediate_scale (`int`, defaults to 4):
            The sense network's last feed-forward layer maps `n_embd -> sense_intermediate_scale * n_embd ->
            num_senses * n_embd`.
        vocab_size (`int`, defaults to 50264):
            GPT-2's 50,257 subwords padded to a multiple of 8, as published.
        n_positions (`int`, defaults to 512):
            Longest sequence the model can read.
        scale_attn_by_inverse_layer_idx (`bool`, defaults to `True`):
            As in the published training configuration.
        kwargs:
            Every other [`~transformers.GPT2Config`] argument (`n_embd`, `n_layer`, `n_head`, dropouts, ...).

    Raises:
        ValueError: if `n_embd` is not divisible by `num_senses` or by `n_head`.
    """

    def __init__(
        self,
        vocab_size: int = 50264,
        n_positions: int = 512,
        num_senses: int = 16,
        sense_intermediate_scale: int = 4,
        scale_attn_by_inverse_layer_idx: bool = True,
        **kwargs,
    ):
        self.num_senses = num_senses
        self.sense_intermediate_scale = sense_intermediate_scale
        super().__init__(
            vocab_size=vocab_size,
            n_positions=n_positions,
            scale_attn_by_inverse_layer_idx=scale_attn_by_inverse_layer_idx,
            **kwargs,
        )
        for name, divisor in (("num_senses", self.num_senses), ("n_head", self.n_head)):
            if divisor < 1 or self.n_embd % divisor:
                raise ValueError(
                    f"n_embd ({self.n_embd}) must be divisible by {name} ({divisor}): every sense head and every "
                    f"attention head gets n_embd / {name} dimensions."
                )
        if self.sense_intermediate_scale < 1:
            raise ValueError(f"sense_intermediate_scale must be >= 1, got {self.sense_intermediate_scale}")


# `save_pretrained` then writes `auto_map["AutoConfig"]` so that a saved folder loads with trust_remote_code=True.
BackpackGPT2Config.register_for_auto_class()
