"""Backpack GPT-2 (Hewitt, Thickstun, Manning, Liang, "Backpack Language Models", ACL 2023).

A Backpack predicts the next word from a weighted sum of non-contextual sense vectors:

    C(x) = SenseNetwork(E x)                                  k sense vectors per word          (k, d)
    h    = GPT2(x_1..n)                                       contextual states                 (n, d)
    α[ℓ] = softmax(q_ℓ(h) k_ℓ(h)ᵀ / sqrt(d/k) + causal mask)  contextualization weights         (k, n, n)
    o_i  = Σ_j Σ_ℓ α[ℓ, i, j] C(x_j)[ℓ]                       Backpack output                   (n, d)
    logits_i = E o_i                                          E is tied to the input embedding  (n, V)

This file reads in that order: sense network -> contextualization weights -> weighted sum -> logits. Because
`o` is linear in the senses, scaling or editing one sense of one word changes every prediction in a known way;
`BackpackGPT2LMHeadModel.set_sense_edit` and the `sense_weights` forward argument expose that control.

The state dict has exactly the published checkpoint's names (``stanfordnlp/backpack-gpt2``), aliases included:
``backpack.word_embeddings`` is ``backpack.gpt2_model.wte`` is ``lm_head``, and ``backpack.position_embeddings``
is ``backpack.gpt2_model.wpe``.

Incremental decoding keeps everything a step needs in one transformers `DynamicCache`: layers ``0 .. n_layer-1``
hold GPT-2's keys and values, and one more layer (index ``n_layer``) holds the Backpack's own state, the
contextualization keys ``k_ℓ`` (batch, k, seq, d/k) as its keys and the senses ``C(x_j)`` (batch, k, seq, d) as its
values. Beam search, cropping and batch selection then work on it like on any other cache layer.

This module imports only torch and transformers, so it travels to the Hub on its own with
``configuration_backpack_gpt2.py``.
"""

import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.gpt2.modeling_gpt2 import GPT2Model, GPT2PreTrainedModel
from transformers.pytorch_utils import Conv1D
from transformers.utils import ModelOutput

try:  # As Hub remote code: transformers' loader copies sibling files that are imported relatively.
    from .configuration_backpack_gpt2 import BackpackGPT2Config
except ImportError:  # As a top-level module installed by setup.py.
    from configuration_backpack_gpt2 import BackpackGPT2Config


SenseWeights = torch.Tensor | Callable[[torch.LongTensor, int], torch.Tensor]

# transformers 5.24 renamed `past_key_values` to `cache`; speak to the installed GPT-2 in its own words.
_GPT2_CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(GPT2Model.forward).parameters else "past_key_values"


def _expose_legacy_cache_name(output: ModelOutput) -> None:
    """Before transformers 5.24, `generate()` reads the cache from the output's `past_key_values` key."""
    if _GPT2_CACHE_ARGUMENT == "past_key_values" and output.cache is not None:
        output["past_key_values"] = output.cache


@dataclass
class BackpackGPT2BaseModelOutput(ModelOutput):
    """Output of [`BackpackGPT2Model`].

    Args:
        last_hidden_state: Backpack output `o = Σ_j Σ_ℓ α[ℓ,i,j] C(x_j)[ℓ]`, (batch, seq, d).
        cache: The cache to continue decoding from, when `use_cache` (before transformers 5.24, also under that
            version's name `past_key_values`, where its `generate()` looks for it).
        hidden_states: GPT-2 contextualization network states, one per layer plus the embeddings, when
            `output_hidden_states`.
        contextualization: α, (batch, senses, query, key), when `output_contextualization`.
        senses: C(x_j) of every key position, (batch, senses, key, d), when `output_senses`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    contextualization: torch.FloatTensor | None = None
    senses: torch.FloatTensor | None = None

    def __post_init__(self):
        super().__post_init__()
        _expose_legacy_cache_name(self)


@dataclass
class BackpackGPT2LMHeadModelOutput(ModelOutput):
    """Output of [`BackpackGPT2LMHeadModel`].

    Args:
        loss: Next-token cross-entropy, when `labels` are given.
        logits: `E o`, (batch, seq, vocab).
        cache, hidden_states, contextualization, senses: as in [`BackpackGPT2BaseModelOutput`].
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    contextualization: torch.FloatTensor | None = None
    senses: torch.FloatTensor | None = None

    def __post_init__(self):
        super().__post_init__()
        _expose_legacy_cache_name(self)


# ---------------------------------------------------------------------------------------------------------------
# 1. Sense network: C(x), a function of the word alone.
# ---------------------------------------------------------------------------------------------------------------


class BackpackMLP(nn.Module):
    """Feed-forward layer `W_2 act(W_1 x)`: (..., embed_dim) -> (..., out_dim), with dropout on the output."""

    def __init__(self, embed_dim: int, intermediate_dim: int, out_dim: int, config: BackpackGPT2Config):
        super().__init__()
        self.c_fc = Conv1D(intermediate_dim, embed_dim)
        self.c_proj = Conv1D(out_dim, intermediate_dim)
        self.act = ACT2FN[config.activation_function]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(hidden_states))))


class BackpackNoMixBlock(nn.Module):
    """A Transformer block without attention (no mixing across positions), as the published sense network has.

        residual = x + dropout(h);  h = LN_1(residual)
        residual = residual + dropout(MLP(h));  h = LN_2(residual)

    Shapes: (batch, seq, d) -> (batch, seq, d).
    """

    def __init__(self, config: BackpackGPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = BackpackMLP(config.n_embd, 4 * config.n_embd, config.n_embd, config)
        self.resid_dropout1 = nn.Dropout(config.resid_pdrop)
        self.resid_dropout2 = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        residual = self.resid_dropout1(hidden_states) + residual
        hidden_states = self.ln_1(residual)
        residual = self.resid_dropout2(self.mlp(hidden_states)) + residual
        return self.ln_2(residual)


class BackpackSenseNetwork(GradientCheckpointingLayer):
    """Sense network C (paper, appendix A.1): k sense vectors per word from its embedding alone.

        r = dropout(E x);  h = NoMixBlock(LN(r), r);  C(x) = FFN(h) reshaped to k vectors

    with the final FFN mapping d -> sense_intermediate_scale·d -> k·d. Its activations are the largest of the
    model (k·d per token), so it is checkpointed with the GPT-2 blocks under gradient checkpointing.

    Shapes: word embeddings (batch, seq, d) -> senses (batch, k, seq, d).
    """

    def __init__(self, config: BackpackGPT2Config):
        super().__init__()
        self.num_senses = config.num_senses
        self.n_embd = config.n_embd
        self.dropout = nn.Dropout(config.embd_pdrop)
        self.block = BackpackNoMixBlock(config)
        self.ln = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.final_mlp = BackpackMLP(
            config.n_embd, config.sense_intermediate_scale * config.n_embd, config.num_senses * config.n_embd, config
        )

    def forward(self, input_embeds: torch.Tensor) -> torch.Tensor:
        residual = self.dropout(input_embeds)
        hidden_states = self.block(self.ln(residual), residual)
        senses = self.final_mlp(hidden_states)
        batch_size, seq_length, _ = senses.shape
        return senses.view(batch_size, seq_length, self.num_senses, self.n_embd).transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------------
# 2. Contextualization weights: α[ℓ] = softmax(q_ℓ k_ℓᵀ / sqrt(d/k)), one key-query head per sense, no values.
# ---------------------------------------------------------------------------------------------------------------


class BackpackWeightNetwork(nn.Module):
    """The key-query layer over GPT-2's output that scores how much each position draws on each other's senses.

    Shapes: contextual states (batch, seq, d) -> queries and keys, each (batch, k, seq, d/k).
    """

    def __init__(self, config: BackpackGPT2Config):
        super().__init__()
        self.num_senses = config.num_senses
        self.head_dim = config.n_embd // config.num_senses
        self.c_attn = nn.Linear(config.n_embd, 2 * config.n_embd)
        self.scaling = 1.0 / math.sqrt(self.head_dim)

    def forward(self, contextual_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size, seq_length, _ = contextual_states.shape
        projected = self.c_attn(contextual_states).view(batch_size, seq_length, 2, self.num_senses, self.head_dim)
        queries, keys = projected.permute(2, 0, 3, 1, 4).unbind(0)
        return queries, keys


def sense_attention_mask(
    attention_mask: torch.Tensor | None, query_length: int, past_length: int, device: torch.device
) -> torch.Tensor:
    """Which keys each query may weigh: causal over absolute positions, padded keys excluded.

    Query i sits at position `past_length + i`. A padded query still sees itself, so that no row is empty (an
    all-masked softmax is NaN); its output is never used. Shapes: (batch, 1, query, key) boolean, True = allowed
    ((1, 1, query, key) without `attention_mask`).
    """
    key_length = past_length + query_length
    query_positions = torch.arange(past_length, key_length, device=device)[:, None]
    key_positions = torch.arange(key_length, device=device)[None, :]
    allowed = (key_positions <= query_positions)[None, None]
    if attention_mask is not None:
        keys_kept = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        allowed = (allowed & keys_kept) | (key_positions == query_positions)
    return allowed


def contextualization_weights(
    queries: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """α[ℓ, i, j] = softmax_j(q_ℓ,i · k_ℓ,j · scaling), over allowed keys only.

    Shapes: queries (batch, k, query, d/k), keys (batch, k, key, d/k), allowed (batch|1, 1, query, key) ->
    α (batch, k, query, key). The softmax runs in float32 at least, then returns to the queries' dtype.
    """
    scores = torch.matmul(queries, keys.transpose(-1, -2)) * scaling
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(queries.dtype)


# ---------------------------------------------------------------------------------------------------------------
# 3. Weighted sum: o_i = Σ_ℓ Σ_j α[ℓ, i, j] C(x_j)[ℓ].
# ---------------------------------------------------------------------------------------------------------------


def weighted_sense_sum(contextualization: torch.Tensor, senses: torch.Tensor) -> torch.Tensor:
    """o = Σ_ℓ α[ℓ] @ C[ℓ] from materialised weights.

    Shapes: α (batch, k, query, key), senses (batch, k, key, d) -> o (batch, query, d).
    """
    return torch.matmul(contextualization, senses).sum(dim=1)


def fused_weighted_sense_sum(
    queries: torch.Tensor,
    keys: torch.Tensor,
    senses: torch.Tensor,
    allowed: torch.Tensor | None,
    is_causal: bool,
    scaling: float,
) -> torch.Tensor:
    """o = Σ_ℓ softmax(q_ℓ k_ℓᵀ · scaling) @ C[ℓ] as attention with the senses as values.

    `scaled_dot_product_attention` never materialises the (batch, k, query, key) weights on its fused kernels,
    which is where a Backpack's extra memory over GPT-2 would otherwise go.

    Shapes: queries (batch, k, query, d/k), keys (batch, k, key, d/k), senses (batch, k, key, d) ->
    o (batch, query, d).
    """
    if queries.shape[2] == 1 and allowed is None:
        # A decoding step: its weights are only (batch, k, 1, key), and one matmul over (sense, key) pairs beats
        # sdpa's general path for a single query.
        batch = queries.shape[0]
        weights = torch.softmax(
            torch.matmul(queries, keys.transpose(-1, -2)) * scaling,
            dim=-1,
            dtype=torch.promote_types(queries.dtype, torch.float32),
        ).to(senses.dtype)
        return torch.matmul(weights.reshape(batch, 1, -1), senses.reshape(batch, -1, senses.shape[-1]))
    if queries.device.type == "cpu" and queries.shape[2] > 1 and queries.shape[-1] != senses.shape[-1]:
        # CPU's fused (flash) kernel wants one head size for q, k and v; zero-padding q and k to d keeps q·k as is.
        # (CUDA's memory-efficient and cuDNN kernels take the senses' larger head size directly.)
        padding = (0, senses.shape[-1] - queries.shape[-1])
        queries, keys = F.pad(queries, padding), F.pad(keys, padding)
    output = F.scaled_dot_product_attention(
        queries, keys, senses, attn_mask=allowed, is_causal=is_causal, scale=scaling
    )
    return output.sum(dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


class BackpackGPT2PreTrainedModel(GPT2PreTrainedModel):
    """Weight initialisation and loading shared by the Backpack models (GPT-2's, plus the sense network's)."""

    config_class = BackpackGPT2Config
    config: BackpackGPT2Config
    base_model_prefix = "backpack"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GPT2Block", "BackpackSenseNetwork"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _can_compile_fullgraph = False
    # Published checkpoints may still carry GPT-2's old causal-mask buffers.
    _keys_to_ignore_on_load_unexpected = [r"attn\.bias", r"attn\.masked_bias"]


class BackpackGPT2Model(BackpackGPT2PreTrainedModel):
    """The Backpack: sense network + GPT-2 contextualization network + contextualization weights -> `o`.

    `last_hidden_state` is the Backpack output `o` (batch, seq, d), which [`BackpackGPT2LMHeadModel`] maps to logits
    with the tied word embedding.
    """

    # The published aliases are the same modules; declaring them lets safetensors store each tensor once.
    _tied_weights_keys = {
        "word_embeddings.weight": "gpt2_model.wte.weight",
        "position_embeddings.weight": "gpt2_model.wpe.weight",
    }

    def __init__(self, config: BackpackGPT2Config):
        super().__init__(config)
        self.embed_dim = config.n_embd
        self.num_senses = config.num_senses
        self.gpt2_model = GPT2Model(config)
        self.sense_network = BackpackSenseNetwork(config)
        # Aliases the published checkpoint also stores: the very same modules as GPT-2's embeddings.
        self.word_embeddings = self.gpt2_model.wte
        self.position_embeddings = self.gpt2_model.wpe
        self.sense_weight_net = BackpackWeightNetwork(config)
        # Persistent sense edits {token id: (k, d) replacement senses}; not saved with the weights.
        self.sense_edits: dict[int, torch.Tensor] = {}
        self.gradient_checkpointing = False
        # Optional (k, vocab, d) table of every word's senses, for fast inference (see `precompute_senses`).
        self.sense_table: torch.Tensor | None = None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.gpt2_model.wte

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.gpt2_model.wte = new_embeddings
        self.word_embeddings = new_embeddings
        self.sense_table = None  # a new vocabulary: the old table no longer applies

    # --- senses ---------------------------------------------------------------------------------------------

    def compute_senses(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """C(x) for every token, with any sense edits applied: (batch, seq) -> (batch, k, seq, d).

        C(x) depends on the word alone, so it is computed once per distinct token of the batch and gathered: real
        text repeats words, and the sense network is the Backpack's most expensive per-token part. (In training a
        word's dropout mask is therefore shared by its occurrences within the batch.)
        """
        words, positions = torch.unique(input_ids, return_inverse=True)
        if self.sense_table is not None and not (self.training and torch.is_grad_enabled()):
            word_senses = self.sense_table[:, words]
        else:
            word_senses = self.sense_network(self.word_embeddings(words)[None])[0]  # (k, words, d)
        for token_id, edited in self.sense_edits.items():
            word_senses = torch.where((words == token_id)[None, :, None], edited.to(word_senses)[:, None], word_senses)
        sense_index = torch.arange(self.num_senses, device=input_ids.device)[None, :, None]
        return word_senses[sense_index, positions[:, None, :]]  # (batch, k, seq, d)

    @torch.no_grad()
    def precompute_senses(self, chunk_size: int = 2048) -> None:
        """Compute C(x) once for the whole vocabulary and read it from a table in inference from now on.

        Trades memory ((k, vocab, d): 1.2 GiB for Backpack-Micro, 2.5 GiB for Small in float32) for skipping the
        sense network at every forward. The table is a snapshot: call again after the weights change, or
        `drop_precomputed_senses()`; training forwards (with gradients) never use it.
        """
        embeddings = self.word_embeddings.weight
        was_training = self.sense_network.training
        self.sense_network.eval()  # no dropout in a table meant for inference
        self.sense_table = torch.cat(
            [self.sense_network(embeddings[start : start + chunk_size][None])[0]
             for start in range(0, embeddings.shape[0], chunk_size)],
            dim=1,
        )
        self.sense_network.train(was_training)

    def drop_precomputed_senses(self) -> None:
        """Go back to computing senses with the sense network."""
        self.sense_table = None

    # --- forward --------------------------------------------------------------------------------------------

    def _check_inputs(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, past_length: int
    ) -> None:
        """Clear errors for what would otherwise fail deep inside (or, on CUDA, as a device-side assert)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}")
        if input_ids.numel() and not torch.compiler.is_compiling():
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= self.config.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(
                    f"input_ids contains token id {bad}, outside the vocabulary [0, {self.config.vocab_size})"
                )
        total_length = past_length + input_ids.shape[1]
        if total_length > self.config.n_positions:
            raise ValueError(
                f"sequence length {total_length} (cached {past_length} + new {input_ids.shape[1]}) exceeds "
                f"n_positions={self.config.n_positions}, the longest sequence this model can read"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != (input_ids.shape[0], total_length):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch, cached + new tokens) = "
                f"{(input_ids.shape[0], total_length)}"
            )

    def _backpack_cache_layer(self, cache: Cache) -> int:
        """Index of the cache layer that holds the contextualization keys and senses, creating it if needed."""
        if not isinstance(cache, DynamicCache):
            raise ValueError(
                f"Backpack GPT-2 caches its senses in a DynamicCache; got {type(cache).__name__}. "
                "Use the default cache (no `cache_implementation`)."
            )
        layer_idx = self.config.n_layer
        while len(cache.layers) <= layer_idx:
            cache.layers.append(DynamicLayer())
        return layer_idx

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_contextualization: bool = False,
        output_senses: bool = False,
        output_hidden_states: bool | None = None,
        sense_weights: SenseWeights | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BackpackGPT2BaseModelOutput:
        """Backpack output `o` for `input_ids`, continuing from `cache` if given.

        Args:
            input_ids: (batch, seq) token ids; required, since senses are functions of words.
            attention_mask: (batch, cached + seq), 1 for tokens and 0 for padding (left or right).
            position_ids: (batch, seq); by default counted from the first non-padding token.
            cache: A `DynamicCache` from an earlier call (`past_key_values` is the same, by its old name).
            sense_weights: δ multiplying α[ℓ, i, j] per (sense, key): a tensor broadcastable to
                (batch, k, cached + seq), or a callable `(input_ids, past_length) -> tensor` called each step.
                The cache keeps the senses unweighted.
            output_contextualization: also return α (batch, k, seq, cached + seq).
            output_senses: also return the senses of every key position (batch, k, cached + seq, d).
        """
        if input_ids is None:
            raise ValueError(
                "Backpack GPT-2 needs input_ids: its senses are functions of the words themselves, so "
                "inputs_embeds alone cannot be used" if inputs_embeds is not None else "input_ids is required"
            )
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # the checkpointed replay would write the cache twice
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        past_length = cache.get_seq_length() if cache is not None else 0
        self._check_inputs(input_ids, attention_mask, past_length)
        query_length = input_ids.shape[1]

        if position_ids is None and attention_mask is not None:
            # Left padding: positions count from each row's first real token, as GPT-2 was trained.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_length:]

        # 1. Senses C(x_j) of the new tokens: (batch, k, seq, d).
        senses = self.compute_senses(input_ids)

        # 2. Contextualization: GPT-2 states -> per-sense queries and keys.
        contextual = self.gpt2_model(
            input_ids,
            **{_GPT2_CACHE_ARGUMENT: cache},
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        queries, keys = self.sense_weight_net(contextual.last_hidden_state)
        if cache is not None:
            keys, senses = cache.update(keys, senses, self._backpack_cache_layer(cache))
        key_length = keys.shape[2]

        values = senses
        if sense_weights is not None:
            weights = sense_weights(input_ids, past_length) if callable(sense_weights) else sense_weights
            values = senses * weights.to(senses.dtype).expand(senses.shape[0], self.num_senses, key_length)[..., None]

        # 3. Weighted sum o = Σ_ℓ α[ℓ] @ C[ℓ]: fused unless the weights themselves are wanted.
        has_padding = attention_mask is not None and not bool(attention_mask.all())
        allowed = None
        if has_padding or 1 < query_length < key_length:
            allowed = sense_attention_mask(attention_mask if has_padding else None, query_length, past_length,
                                           input_ids.device)
        scaling = self.sense_weight_net.scaling
        contextualization = None
        if output_contextualization or self.config._attn_implementation == "eager":
            if allowed is None and query_length > 1:
                allowed = sense_attention_mask(None, query_length, past_length, input_ids.device)
            contextualization = contextualization_weights(queries, keys, allowed, scaling)
            hidden_states = weighted_sense_sum(contextualization, values)
        else:
            is_causal = allowed is None and query_length > 1
            hidden_states = fused_weighted_sense_sum(queries, keys, values, allowed, is_causal, scaling)

        return BackpackGPT2BaseModelOutput(
            last_hidden_state=hidden_states,
            cache=cache,
            hidden_states=contextual.hidden_states,
            contextualization=contextualization if output_contextualization else None,
            senses=senses if output_senses else None,
        )


class BackpackGPT2LMHeadModel(BackpackGPT2PreTrainedModel, GenerationMixin):
    """Backpack GPT-2 language model: logits = E o, with E tied to the word embedding.

    Works with `generate()` (greedy, sampling, beam search; left-padded batches) and
    `pipeline("text-generation")`. Sense-level control lives here too: `sense_vectors`, `sense_logits`,
    `set_sense_edit` / `remove_sense_edits`, and the `sense_weights` forward argument.
    """

    _tied_weights_keys = {"lm_head.weight": "backpack.gpt2_model.wte.weight"}

    def __init__(self, config: BackpackGPT2Config):
        super().__init__(config)
        self.backpack = BackpackGPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backpack.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.backpack.set_input_embeddings(new_embeddings)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    # --- 4. logits ------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_contextualization: bool = False,
        output_senses: bool = False,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        sense_weights: SenseWeights | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> BackpackGPT2LMHeadModelOutput | tuple:
        """Logits `E o` (batch, seq, vocab); with `labels`, the mean next-token cross-entropy.

        `labels` are shifted inside (pass `labels=input_ids`); -100 is ignored. `logits_to_keep=n` computes only
        the last n positions' logits (what `generate()` needs). Other arguments: see [`BackpackGPT2Model.forward`].
        """
        outputs = self.backpack(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            use_cache=use_cache,
            output_contextualization=output_contextualization,
            output_senses=output_senses,
            output_hidden_states=output_hidden_states,
            sense_weights=sense_weights,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)

        output = BackpackGPT2LMHeadModelOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            contextualization=outputs.contextualization,
            senses=outputs.senses,
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()

    # --- sense-level readout and control --------------------------------------------------------------------

    def _token_ids(self, token_ids: Iterable[int] | torch.Tensor) -> torch.LongTensor:
        """1-D LongTensor of token ids on the model's device, checked against the vocabulary."""
        ids = torch.as_tensor(list(token_ids) if not isinstance(token_ids, torch.Tensor) else token_ids)
        ids = ids.reshape(-1).to(device=self.device, dtype=torch.long)
        if ids.numel() == 0:
            raise ValueError("no token ids given")
        bad = ids[(ids < 0) | (ids >= self.config.vocab_size)]
        if bad.numel():
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary [0, {self.config.vocab_size})")
        return ids

    def sense_vectors(self, token_ids: Iterable[int] | torch.Tensor) -> torch.Tensor:
        """C(x) for each token id, sense edits included: (n,) -> (n, k, d)."""
        ids = self._token_ids(token_ids)
        return self.backpack.compute_senses(ids[None])[0].transpose(0, 1)

    def sense_logits(self, token_ids: Iterable[int] | torch.Tensor) -> torch.Tensor:
        """E·C(x)[ℓ], each sense's contribution direction over the vocabulary: (n,) -> (n, k, vocab)."""
        return self.lm_head(self.sense_vectors(token_ids))

    def precompute_senses(self, chunk_size: int = 2048) -> None:
        """Tabulate every word's senses for faster inference; see [`BackpackGPT2Model.precompute_senses`]."""
        self.backpack.precompute_senses(chunk_size)

    def drop_precomputed_senses(self) -> None:
        """Compute senses with the sense network again."""
        self.backpack.drop_precomputed_senses()

    def set_sense_edit(self, token_id: int, senses: torch.Tensor) -> None:
        """Replace word `token_id`'s k sense vectors by `senses` (k, d) in every context, until removed.

        Under a cache the edit applies to tokens processed after it is set; edit before generating.
        """
        token_id = int(self._token_ids([token_id])[0])
        expected = (self.config.num_senses, self.config.n_embd)
        if tuple(senses.shape) != expected:
            raise ValueError(f"sense edit for token {token_id} has shape {tuple(senses.shape)}, expected {expected}")
        if not torch.isfinite(senses).all():
            raise ValueError(f"sense edit for token {token_id} contains NaN or inf")
        self.backpack.sense_edits[token_id] = senses.detach().to(device=self.device, dtype=self.dtype)

    def remove_sense_edits(self, token_ids: Iterable[int] | None = None) -> None:
        """Undo the sense edits of `token_ids` (all of them by default)."""
        if token_ids is None:
            self.backpack.sense_edits.clear()
            return
        for token_id in token_ids:
            self.backpack.sense_edits.pop(int(token_id), None)


__all__ = ["BackpackGPT2Model", "BackpackGPT2LMHeadModel", "BackpackGPT2PreTrainedModel"]

# `save_pretrained` then writes `auto_map` and copies this file and the configuration beside the weights.
BackpackGPT2LMHeadModel.register_for_auto_class("AutoModelForCausalLM")
