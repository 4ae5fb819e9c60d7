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
``backpack.word_embeddings`` and ``lm_head`` are tied to ``backpack.gpt2_model.wte``, and
``backpack.position_embeddings`` to ``backpack.gpt2_model.wpe`` (transformers' tied weights).

Incremental decoding uses a Backpack cache: a transformers `DynamicCache` or `StaticCache` whose `layers` are the
Transformer's (one per GPT-2 block, as every cache tool expects) plus a `sense_layer` beside them holding the
contextualization keys k_ℓ (batch, k, seq, d/k) and the senses C(x_j) (batch, k, seq, d). Beam search, cropping,
batch selection and `generate(cache_implementation="static")` handle both. A plain `DynamicCache` or `StaticCache`
that a caller passes keeps its class and gets the sense layer as an attribute; transformers' on-device exporters,
which build their own `StaticCache`, use sense buffers reserved in the model. A decoding step asks the device
nothing back (no `.item()`, no data-dependent shapes), so it can be captured by `torch.compile(fullgraph=True)` and
CUDA graphs.

Padding-free batches (several sequences in a row, told apart by `position_ids` that restart at 0, as
`DataCollatorWithFlattening` and TRL's packing make them) keep every sequence to itself, in GPT-2's attention and
in α alike.

This module imports only torch and transformers, so it travels to the Hub on its own with
``configuration_backpack_gpt2.py``.
"""

import inspect
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig, GenerationMixin, __version__
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticCache, StaticLayer
from transformers.masking_utils import find_packed_sequence_indices
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.gpt2.modeling_gpt2 import GPT2Model, GPT2PreTrainedModel
from transformers.pytorch_utils import Conv1D
from transformers.utils import ModelOutput, can_return_tuple

try:  # As Hub remote code: transformers' loader copies sibling files that are imported relatively.
    from .configuration_backpack_gpt2 import BackpackGPT2Config
except ImportError:  # As a top-level module installed by setup.py.
    from configuration_backpack_gpt2 import BackpackGPT2Config


SenseWeights = torch.Tensor | Callable[[torch.LongTensor | None, int | torch.Tensor], torch.Tensor]

# transformers 5.24 renamed `past_key_values` to `cache` (the floor, 5.4, has the old name): the installed version's
# name of the cache, as an argument of a model's forward and as a key of its output. Benchmarks and tools that
# drive GPT-2 and the Backpack alike import it from here.
CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(GPT2Model.forward).parameters else "past_key_values"


def _expose_legacy_cache_name(output: ModelOutput) -> None:
    """Before transformers 5.24, `generate()` reads the cache from the output's `past_key_values` key."""
    if CACHE_ARGUMENT == "past_key_values" and output.cache is not None:
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
        attentions: GPT-2's attention maps, one (batch, heads, query, key) per layer, when `output_attentions`
            (the eager attention implementation computes them; fused kernels never form them).
        contextualization: α, (batch, senses, query, key), when `output_contextualization`.
        senses: C(x_j) of every key position, (batch, senses, key, d), when `output_senses`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
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
        cache, hidden_states, attentions, contextualization, senses: as in [`BackpackGPT2BaseModelOutput`].
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    contextualization: torch.FloatTensor | None = None
    senses: torch.FloatTensor | None = None

    def __post_init__(self):
        super().__post_init__()
        _expose_legacy_cache_name(self)


# ---------------------------------------------------------------------------------------------------------------
# 0. The cache: GPT-2's layers, plus the senses and contextualization keys of every position seen so far.
# ---------------------------------------------------------------------------------------------------------------


class BackpackCacheMixin:
    """What a Backpack adds to a transformers cache: `sense_layer`, beside (not among) the Transformer's `layers`.

    The sense layer is a cache layer of the same kind as the others (dynamic or static) whose keys are the
    contextualization keys (batch, k, seq, d/k) and whose values are the senses (batch, k, seq, d). Every operation
    that `generate()` applies to the cache (beam reordering, cropping, batch expansion and selection, reset)
    applies to it too.
    """

    sense_layer: DynamicLayer | StaticLayer

    def reset(self) -> None:
        super().reset()
        self.sense_layer.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.sense_layer.reorder_cache(beam_idx)

    def crop(self, max_length: int) -> None:
        super().crop(max_length)
        self.sense_layer.crop(max_length)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.sense_layer.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.sense_layer.batch_select_indices(indices)

    @property
    def is_compileable(self) -> bool:
        return super().is_compileable and self.sense_layer.is_compileable


class BackpackDynamicCache(BackpackCacheMixin, DynamicCache):
    """A `DynamicCache` (grows with every step) that also caches the Backpack's senses and contextualization keys."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sense_layer = DynamicLayer()


class BackpackStaticCache(BackpackCacheMixin, StaticCache):
    """A `StaticCache` (fixed-size buffers, for `torch.compile` and CUDA graphs) that also holds the senses."""

    def __init__(self, config, max_cache_len: int, *args, **kwargs):
        super().__init__(config, max_cache_len, *args, **kwargs)
        self.sense_layer = StaticLayer(max_cache_len=max_cache_len)


class SenseBuffers(nn.Module):
    """A static sense layer whose tensors are buffers of the model, for transformers' on-device exporters.

    `TorchExportableModuleForDecoderOnlyLM` and `convert_and_export_with_cache` give the model a plain
    `StaticCache` whose tensors they registered as buffers: the state an exported program keeps from one call to
    the next. The Backpack's own state has to be a buffer before export begins too, so it is reserved here
    (see [`BackpackGPT2Model.reserve_sense_buffers`]); a smaller cache uses the first rows and slots.

    Shapes: keys (batch, k, slots, d/k), values (batch, k, slots, d).
    """

    is_initialized = True

    def __init__(self, batch_size: int, max_cache_len: int, config: BackpackGPT2Config, dtype: torch.dtype,
                 device: torch.device | str | None):
        super().__init__()
        shape = (batch_size, config.num_senses, max_cache_len)
        head_dim = config.n_embd // config.num_senses
        self.register_buffer("keys", torch.zeros(*shape, head_dim, dtype=dtype, device=device), persistent=False)
        self.register_buffer("values", torch.zeros(*shape, config.n_embd, dtype=dtype, device=device),
                             persistent=False)

    def view_for(self, batch_size: int, max_cache_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `batch_size` rows and `max_cache_len` slots, as views (writes reach the buffers)."""
        reserved = (self.keys.shape[0], self.keys.shape[2])
        if batch_size > reserved[0] or max_cache_len > reserved[1]:
            raise ValueError(
                f"the Backpack's sense buffers hold {reserved[0]} rows of {reserved[1]} positions, but the cache "
                f"{batch_size} of {max_cache_len}: call model.backpack.reserve_sense_buffers({batch_size}, "
                f"{max_cache_len}) before exporting"
            )
        return self.keys[:batch_size, :, :max_cache_len], self.values[:batch_size, :, :max_cache_len]


def sense_layer_of(cache: Cache) -> DynamicLayer | StaticLayer:
    """The layer holding the contextualization keys and senses of `cache`'s positions.

    A Backpack cache has its own. A plain transformers `DynamicCache` or `StaticCache` that a caller built (e.g.
    `DynamicCache(config=...)`, as the transformers docs show) gets one as an attribute: its class stays as it is,
    and the caller's own reference holds the senses to continue from.
    """
    layer = getattr(cache, "sense_layer", None)
    if layer is not None:
        return layer
    if type(cache) is DynamicCache:
        layer = DynamicLayer()
    elif type(cache) is StaticCache:
        layer = StaticLayer(max_cache_len=cache.layers[0].max_cache_len)
    else:
        raise ValueError(
            f"Backpack GPT-2 keeps its senses in a DynamicCache or a StaticCache; got {type(cache).__name__}. "
            "Use the default cache or cache_implementation='static'."
        )
    cache.sense_layer = layer
    return layer


def as_backpack_cache(cache: Cache) -> BackpackDynamicCache | BackpackStaticCache:
    """A Backpack cache sharing `cache`'s state, for `generate()`, whose cache operations must reach the senses.

    A Backpack cache is returned as it is. For a plain `DynamicCache` or `StaticCache` the result is a second
    object over the same state (the same attribute dictionary: the same layers and sense layer), so that beam
    reordering, cropping and batch selection reach the senses too, while the caller's object keeps its class and
    sees every update.
    """
    if isinstance(cache, BackpackCacheMixin):
        return cache
    sense_layer_of(cache)
    backpack_cache = object.__new__(BackpackStaticCache if isinstance(cache, StaticCache) else BackpackDynamicCache)
    backpack_cache.__dict__ = cache.__dict__
    return backpack_cache


def update_sense_layer(
    layer: DynamicLayer | StaticLayer | tuple[torch.Tensor, torch.Tensor],
    keys: torch.Tensor,
    senses: torch.Tensor,
    past_length: int | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Store the new positions' keys and senses; returns those of every cached position (static: every slot).

    They are written at `past_length`, the Transformer layers' length, so that the sense layer follows those layers
    wherever they were set (an exporter moves them to each call's position) or cropped (through a plain cache's
    own methods). `layer` may also be a (keys, values) pair of preallocated static tensors.

    Shapes: keys (batch, k, new, d/k), senses (batch, k, new, d) -> (batch, k, cached + new | slots, d/k and d).
    """
    if isinstance(layer, DynamicLayer):
        stored = layer.get_seq_length()
        if stored > past_length:
            layer.crop(past_length)
        elif stored < past_length:
            raise ValueError(
                f"the cache holds {past_length} positions of GPT-2's attention but the senses of only {stored}: it "
                "was filled without the Backpack (another model, or GPT-2 alone); start from an empty cache"
            )
        return layer.update(keys, senses)
    if isinstance(layer, StaticLayer):
        if not layer.is_initialized:
            layer.lazy_initialization(keys, senses)
        layer = (layer.keys, layer.values)
    key_buffer, sense_buffer = layer
    slots = past_length + torch.arange(keys.shape[-2], device=keys.device)
    key_buffer.index_copy_(2, slots, keys)
    sense_buffer.index_copy_(2, slots, senses)
    return key_buffer, sense_buffer


# ---------------------------------------------------------------------------------------------------------------
# 1. Sense network: C(x), a function of the word alone.
# ---------------------------------------------------------------------------------------------------------------


class ResidualProjection(Conv1D):
    """The output projection of a sense-network MLP: a Conv1D that `_init_weights` starts smaller."""


class BackpackMLP(nn.Module):
    """Feed-forward layer `W_2 act(W_1 x)`: (..., embed_dim) -> (..., out_dim), with dropout on the output."""

    def __init__(self, embed_dim: int, intermediate_dim: int, out_dim: int, config: BackpackGPT2Config):
        super().__init__()
        self.c_fc = Conv1D(intermediate_dim, embed_dim)
        self.c_proj = ResidualProjection(out_dim, intermediate_dim)
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


def gather_word_senses(word_senses: torch.Tensor, sense_index: torch.LongTensor) -> torch.Tensor:
    """Every position's senses from a table of distinct words: C(x_j) = table[index_j].

    C depends on the word alone, so a batch needs it once per distinct word; `index_j` says which row of the
    table is position j's word. A lookup (`F.embedding`), whose backward sums the positions' gradients into their
    word's row.

    Shapes: table (words, k, d), index (batch, seq) -> senses (batch, k, seq, d), the sense network's layout.
    """
    num_words, num_senses, embed_dim = word_senses.shape
    batch_size, seq_length = sense_index.shape
    rows = F.embedding(sense_index, word_senses.reshape(num_words, num_senses * embed_dim))
    return rows.view(batch_size, seq_length, num_senses, embed_dim).transpose(1, 2)


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


def unpadded_as_none(
    attention_mask: torch.Tensor | None, past_length: int | torch.Tensor, static: bool
) -> torch.Tensor | None:
    """`None` for a 2D mask that keeps every token, so that an unpadded batch runs the fused causal kernels.

    Tokenizers, data collators, the HF `Trainer` and TRL send an all-ones mask with every unpadded batch. It is
    read only where no decoding step pays for it: before anything is cached (a training step, the prefill of
    `generate()`), from host memory for CPU tensors and with one device read otherwise, as GPT-2 reads its own
    mask outside compiled code. Compiled graphs, the meta device and cached decoding keep the mask.
    """
    if attention_mask is None or attention_mask.dim() != 2 or static or not isinstance(past_length, int):
        return attention_mask
    if past_length > 0 or torch.compiler.is_compiling() or attention_mask.device.type == "meta":
        return attention_mask
    return None if bool(attention_mask.all()) else attention_mask


def packed_sequence_ids(position_ids: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
    """Which sequence each position belongs to, when several are packed in a row without padding.

    Padding-free batches (`DataCollatorWithFlattening`, TRL's packing, flash-attention's variable-length path) tell
    their sequences apart by `position_ids` that restart: transformers' `find_packed_sequence_indices` reads the
    boundaries, the same ones its GPT-2 masks by. `None` when every row holds one sequence; while tracing the
    values cannot be read, so the ids are always returned (a single sequence then gets the causal mask it had).

    Shapes: position_ids (batch | 1, seq) -> (batch, seq) sequence index per position, or None.
    """
    if position_ids is None or position_ids.shape[-1] < 2 or position_ids.device.type == "meta":
        return None
    return find_packed_sequence_indices(position_ids.expand(batch_size, -1))


def sense_attention_mask(
    attention_mask: torch.Tensor | None,
    query_positions: torch.Tensor,
    key_length: int,
    sequence_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which keys each query may weigh: causal over absolute cache positions, padded keys excluded.

    `query_positions` (query,) are the new tokens' slots in the cache (`past_length + i`). `attention_mask` is
    either the 2D padding mask (batch, ≤ key), whose missing tail (a static cache's unused slots) counts as padding,
    or a 4D mask (batch, 1, query, key) already built for GPT-2's attention (boolean, or additive with 0 = allowed),
    as `generate()` prepares for static caches. A padded query still sees itself, so that no row is empty (an
    all-masked softmax is NaN); its output is never used. `sequence_ids` (batch, seq) of a packed row (no cache,
    no padding) keep each query within its own sequence: a block-diagonal causal mask.

    Shapes: -> (batch | 1, 1, query, key) boolean, True = allowed.
    """
    key_positions = torch.arange(key_length, device=query_positions.device)
    causal = (key_positions[None, :] <= query_positions[:, None])[None, None]
    if sequence_ids is not None:
        causal = causal & (sequence_ids[:, None, :, None] == sequence_ids[:, None, None, :])
    if attention_mask is None:
        return causal
    itself = (key_positions[None, :] == query_positions[:, None])[None, None]
    if attention_mask.dim() == 4:
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        return allowed[..., :key_length].to(query_positions.device) | itself
    keys_kept = attention_mask.to(device=query_positions.device, dtype=torch.bool)
    keys_kept = F.pad(keys_kept, (0, key_length - keys_kept.shape[-1]))[:, None, None, :]
    return (causal & keys_kept) | itself


def contextualization_weights(
    queries: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor, scaling: float
) -> torch.Tensor:
    """α[ℓ, i, j] = softmax_j(q_ℓ,i · k_ℓ,j · scaling), over allowed keys only.

    Shapes: queries (batch, k, query, d/k), keys (batch, k, key, d/k), allowed (batch|1, 1, query, key) ->
    α (batch, k, query, key). The softmax runs in float32 at least, then returns to the queries' dtype.
    """
    scores = torch.matmul(queries, keys.transpose(-1, -2)) * scaling
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


def decoding_step_sense_sum(
    queries: torch.Tensor, keys: torch.Tensor, senses: torch.Tensor, allowed: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """o for one new position per row: α (batch, k, 1, key) is small, so it is formed, and the sum over (sense, key)
    pairs is one matmul: (batch, 1, k·key) @ (batch, k·key, d).

    Shapes: queries (batch, k, 1, d/k), keys (batch, k, key, d/k), senses (batch, k, key, d),
    allowed (batch|1, 1, 1, key) or None (every key) -> o (batch, 1, d).
    """
    scores = torch.matmul(queries, keys.transpose(-1, -2)) * scaling
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(senses.dtype)
    batch_size = queries.shape[0]
    return torch.matmul(weights.reshape(batch_size, 1, -1), senses.reshape(batch_size, -1, senses.shape[-1]))


def fused_weighted_sense_sum(
    queries: torch.Tensor, keys: torch.Tensor, senses: torch.Tensor, allowed: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """o = Σ_ℓ softmax(q_ℓ k_ℓᵀ · scaling) @ C[ℓ] as attention with the senses as values.

    `scaled_dot_product_attention` never materialises the (batch, k, query, key) weights on its fused kernels,
    which is where a Backpack's extra memory over GPT-2 would otherwise go. `allowed=None` means causal from
    position 0 (no cache, no padding).

    Shapes: queries (batch, k, query, d/k), keys (batch, k, key, d/k), senses (batch, k, key, d),
    allowed (batch|1, 1, query, key) or None -> o (batch, query, d).
    """
    if queries.device.type == "cpu" and queries.shape[-1] != senses.shape[-1]:
        # CPU's fused (flash) kernel wants one head size for q, k and v; zero-padding q and k to d keeps q·k as is.
        # (CUDA's memory-efficient and cuDNN kernels take the senses' larger head size directly.)
        padding = (0, senses.shape[-1] - queries.shape[-1])
        queries, keys = F.pad(queries, padding), F.pad(keys, padding)
    output = F.scaled_dot_product_attention(
        queries, keys, senses, attn_mask=allowed, is_causal=allowed is None, scale=scaling
    )
    return output.sum(dim=1)


# The CPU's fused kernel pads q and k to the senses' width d (one head size for q, k and v), which doubles its
# work: k·n²·d for the scores as well as for the values. Blocks of queries that stop at the diagonal compute the
# scores at their own width (d/k) and skip most of the masked half.
CAUSAL_SENSE_SUM_BLOCK = 64  # queries per block: α of one block is (batch, k, 64, ≤ seq), never (batch, k, seq, seq)


def _causal_blocks(
    queries: torch.Tensor, keys: torch.Tensor, scaling: float, block: int
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Each block of queries with its causal α over the keys up to its last query, recomputed on demand.

    Yields (start, stop, α) with α (batch, k, stop - start, stop) in float32 at least, masked entries exactly 0.
    """
    seq_length = queries.shape[2]
    positions = torch.arange(seq_length, device=queries.device)
    for start in range(0, seq_length, block):
        stop = min(start + block, seq_length)
        scores = torch.matmul(queries[:, :, start:stop], keys[:, :, :stop].transpose(-1, -2)) * scaling
        later = positions[None, :stop] > positions[start:stop, None]
        scores = scores.masked_fill(later, torch.finfo(scores.dtype).min)
        yield start, stop, torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))


def _flat_weights(weights: torch.Tensor) -> torch.Tensor:
    """α (batch, k, query, key) -> (batch, query, key·k), ordered as the flat values (key j, sense ℓ) -> j·k + ℓ."""
    batch_size, num_senses, query_length, key_length = weights.shape
    return weights.permute(0, 2, 3, 1).reshape(batch_size, query_length, key_length * num_senses)


class BlockwiseCausalSenseSum(torch.autograd.Function):
    """o = Σ_ℓ softmax(q_ℓ k_ℓᵀ · scaling + causal) @ C[ℓ], a block of queries at a time, α recomputed in backward.

    For one block of queries, the sum over (sense, key) pairs is one matmul: α (batch, query, key·k) @
    C (batch, key·k, d), with C in its natural (batch, key, k, d) layout. Backward recomputes each block's α
    (the scores are d/k wide, so recomputing them costs 1/k of the sum) rather than keeping it: memory stays
    that of the fused kernel's, one block's α at a time.

    Shapes: queries (batch, k, seq, d/k), keys (batch, k, seq, d/k), senses (batch, k, seq, d) -> o (batch, seq, d).
    """

    @staticmethod
    def forward(ctx, queries: torch.Tensor, keys: torch.Tensor, senses: torch.Tensor, scaling: float,
                block: int) -> torch.Tensor:
        batch_size, num_senses, seq_length, embed_dim = senses.shape
        values = senses.transpose(1, 2).reshape(batch_size, seq_length * num_senses, embed_dim)
        output = senses.new_empty(batch_size, seq_length, embed_dim)
        for start, stop, weights in _causal_blocks(queries, keys, scaling, block):
            torch.bmm(_flat_weights(weights.to(values.dtype)), values[:, : stop * num_senses],
                      out=output[:, start:stop])
        ctx.save_for_backward(queries, keys, values)
        ctx.scaling, ctx.block = scaling, block
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        queries, keys, values = ctx.saved_tensors
        batch_size, num_senses, seq_length, _ = queries.shape
        grad_queries, grad_keys = torch.zeros_like(queries), torch.zeros_like(keys)
        grad_values = torch.zeros_like(values)
        for start, stop, weights in _causal_blocks(queries, keys, ctx.scaling, ctx.block):
            grad_block = grad_output[:, start:stop].to(values.dtype)
            grad_values[:, : stop * num_senses].baddbmm_(_flat_weights(weights.to(values.dtype)).transpose(1, 2),
                                                         grad_block)
            # dα = dO @ Cᵀ, back in α's layout; softmax backward: ds = α (dα - Σ_j α dα).
            grad_weights = torch.bmm(grad_block, values[:, : stop * num_senses].transpose(1, 2))
            grad_weights = grad_weights.view(batch_size, stop - start, stop, num_senses).permute(0, 3, 1, 2)
            grad_scores = weights * (grad_weights - (grad_weights * weights).sum(dim=-1, keepdim=True))
            grad_scores = (grad_scores * ctx.scaling).to(queries.dtype)
            grad_queries[:, :, start:stop] = torch.matmul(grad_scores, keys[:, :, :stop])
            grad_keys[:, :, :stop] += torch.matmul(grad_scores.transpose(-1, -2), queries[:, :, start:stop])
        grad_senses = grad_values.view(batch_size, seq_length, num_senses, -1).transpose(1, 2)
        return grad_queries, grad_keys, grad_senses, None, None


def sense_sum(
    queries: torch.Tensor,
    keys: torch.Tensor,
    senses: torch.Tensor,
    allowed: torch.Tensor | None,
    scaling: float,
    past_length: int | torch.Tensor,
    materialize: bool,
    decoding_step: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """o = Σ_ℓ α[ℓ] @ C[ℓ] by the cheapest path that gives what is asked, and α when `materialize`.

    - `materialize` (α is wanted, or the eager implementation is asked for): α formed, then summed;
    - `decoding_step` (one new token after cached ones): α is small, one matmul over (sense, key) pairs;
    - causal from position 0 on a CPU, eager: blocks of queries (`BlockwiseCausalSenseSum`), α never kept;
    - otherwise: fused attention with the senses as values, α never formed.

    `allowed=None` means causal from position `past_length` over every key. Shapes: queries (batch, k, query, d/k),
    keys (batch, k, key, d/k), senses (batch, k, key, d) -> o (batch, query, d), α (batch, k, query, key) or None.
    """
    if materialize:
        if allowed is None:
            query_positions = past_length + torch.arange(queries.shape[2], device=queries.device)
            allowed = sense_attention_mask(None, query_positions, keys.shape[2])
        contextualization = contextualization_weights(queries, keys, allowed, scaling)
        return weighted_sense_sum(contextualization, senses), contextualization
    if decoding_step:
        return decoding_step_sense_sum(queries, keys, senses, allowed, scaling), None
    if (allowed is None and isinstance(past_length, int) and past_length == 0 and queries.device.type == "cpu"
            and not torch.compiler.is_compiling()):
        # Compiled graphs and exporters keep the fused kernel: one operator they know.
        return BlockwiseCausalSenseSum.apply(queries, keys, senses, scaling, CAUSAL_SENSE_SUM_BLOCK), None
    return fused_weighted_sense_sum(queries, keys, senses, allowed, scaling), None


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


class TiedEmbedding(nn.Embedding):
    """A second name for an embedding: its weight is `source`'s, tied through `_tied_weights_keys` as `lm_head` is.

    The published checkpoint stores E and P twice (``word_embeddings`` and ``gpt2_model.wte``); declaring the
    second name as a tied weight, rather than aliasing the module, lets loading report a missing embedding as missing.
    """

    def __init__(self, source: nn.Embedding):
        super().__init__(source.num_embeddings, source.embedding_dim, _weight=source.weight)


# transformers before 5.15 skips GPT-2's scaled residual initialisation (it compared full parameter names with
# "c_proj.weight"): the Backpack then applies it to its GPT-2 itself.
GPT2_SKIPS_SCALED_INIT = tuple(int(part) for part in __version__.split(".")[:2]) < (5, 15)


class BackpackGPT2PreTrainedModel(GPT2PreTrainedModel):
    """Weight initialisation and loading shared by the Backpack models (GPT-2's, plus the sense network's)."""

    config_class = BackpackGPT2Config
    config: BackpackGPT2Config
    base_model_prefix = "backpack"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GPT2Block", "BackpackSenseNetwork"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _can_compile_fullgraph = True
    # Published checkpoints may still carry GPT-2's old causal-mask buffers.
    _keys_to_ignore_on_load_unexpected = [r"attn\.bias", r"attn\.masked_bias"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The published recipe for the Backpack's own layers, written out rather than inherited by class.

        Every linear layer and embedding ~ N(0, initializer_range), biases 0, LayerNorms (1, 0); the output
        projections of the sense network's two MLPs ~ N(0, initializer_range / sqrt(2·1)), 0.0141 for the default
        0.02, as the paper's code configures its sense ("content") network: one residual layer. The GPT-2
        contextualization network is a transformers model of its own and gets GPT-2's recipe from it (its residual
        projections scaled by 1/sqrt(2·n_layer); applied here where transformers' GPT-2 skips that).
        """
        std = self.config.initializer_range
        if isinstance(module, TiedEmbedding):
            return  # its weight is GPT-2's, initialised there
        if isinstance(module, BackpackGPT2Model) and GPT2_SKIPS_SCALED_INIT:
            for block in module.gpt2_model.h:
                for projection in (block.attn.c_proj, block.mlp.c_proj):
                    init.normal_(projection.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))
            return
        if isinstance(module, ResidualProjection):
            init.normal_(module.weight, mean=0.0, std=std / math.sqrt(2 * 1))
            init.zeros_(module.bias)
        elif isinstance(module, (nn.Linear, Conv1D)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


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
        # The published checkpoint's second names for E and P: tied weights (`_tied_weights_keys`), as `lm_head` is.
        self.word_embeddings = TiedEmbedding(self.gpt2_model.wte)
        self.position_embeddings = TiedEmbedding(self.gpt2_model.wpe)
        self.sense_weight_net = BackpackWeightNetwork(config)
        # Reserved only for transformers' exporters (`reserve_sense_buffers`).
        self.register_module("sense_buffers", None)
        # Persistent sense edits {token id: (k, d) replacement senses}; not saved with the weights.
        self.sense_edits: dict[int, torch.Tensor] = {}
        self.gradient_checkpointing = False
        # Optional (k, vocab, d) table of every word's senses, for fast inference (see `precompute_senses`). A
        # buffer, so that it follows `.to(device/dtype)`; non-persistent, so that it is never saved.
        self.register_buffer("sense_table", None, persistent=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.gpt2_model.wte

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.gpt2_model.wte = new_embeddings
        self.word_embeddings = TiedEmbedding(new_embeddings)
        self.sense_table = None  # a new vocabulary: the old table no longer applies

    # --- senses ---------------------------------------------------------------------------------------------

    def compute_senses(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None = None,
        sense_index: torch.LongTensor | None = None,
        sense_words: torch.LongTensor | None = None,
        word_senses: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """C(x) for every position, with any sense edits applied: (batch, seq) -> (batch, k, seq, d).

        From the precomputed table when there is one (inference), otherwise from the word embeddings E x, or from
        `inputs_embeds` when the positions are given as vectors (no word: sense edits and the table do not apply).
        On the GPU and under `torch.compile` every position is computed on its own, so that no shape depends on
        the data and a decoding or training step captures as one graph. Eager CPU inference on several tokens
        computes each distinct word once instead (a host-side `unique`, no device to wait for): real text repeats
        words, and the sense network is the Backpack's costliest per-token part.

        Distinct words with gradients, as the trainer runs them: with `sense_index` (batch, seq), position j reads
        row `sense_index[j]` of a table of distinct words, either computed here from `sense_words` (words,) or given
        as `word_senses` (words, k, d) from [`~BackpackGPT2Model.word_senses`]. Whoever lists the words does so on
        the host, ahead of the step and padded to a fixed size, so no shape depends on the data.
        """
        inference = not (self.training and torch.is_grad_enabled())
        if sense_index is not None:
            table = word_senses if word_senses is not None else self.word_senses(sense_words)
            senses = gather_word_senses(table, sense_index)
        elif inputs_embeds is not None:
            senses = self.sense_network(inputs_embeds)
        elif self.sense_table is not None and inference:
            senses = self.sense_table[:, input_ids].transpose(0, 1)  # (k, batch, seq, d) -> (batch, k, seq, d)
        elif (inference and input_ids.device.type == "cpu" and input_ids.shape[1] > 1
              and not torch.compiler.is_compiling()):
            words, positions = torch.unique(input_ids, return_inverse=True)
            senses = gather_word_senses(self.word_senses(words), positions)
        else:
            senses = self.sense_network(self.word_embeddings(input_ids))
        if input_ids is not None:
            for token_id, edited in self.sense_edits.items():
                is_word = (input_ids == token_id)[:, None, :, None]
                senses = torch.where(is_word, edited.to(senses)[None, :, None, :], senses)
        return senses

    def word_senses(self, words: torch.LongTensor) -> torch.Tensor:
        """C(x) once per listed word: (words,) -> (words, k, d), without sense edits (they apply per position).

        The sense network's dropout draws one mask per row, so a table computed once per batch (or per optimizer
        step) drops the same units of a word at all its positions there, where the per-position path draws a mask
        per position. With dropout off both give the same senses and gradients.
        """
        senses = self.sense_network(self.word_embeddings(words)[None])  # (1, k, words, d)
        return senses[0].transpose(0, 1)  # (words, k, d), contiguous

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

    @staticmethod
    def _past_length(cache: Cache | None) -> int | torch.Tensor:
        """Positions already cached in GPT-2's layers: an int for a dynamic cache, a 0-d tensor for a static one
        (no device sync). The sense layer follows them (see `update_sense_layer`)."""
        if cache is None:
            return 0
        length = cache.get_seq_length()
        # A static layer returns its own counter, which its next update increments in place: keep today's value.
        return length.clone() if isinstance(length, torch.Tensor) else length

    def reserve_sense_buffers(self, batch_size: int = 1, max_cache_len: int | None = None) -> None:
        """Preallocate the sense layer that transformers' exporters need, as buffers of this model.

        `TorchExportableModuleForDecoderOnlyLM(model).export(...)` and `convert_and_export_with_cache(model)` run
        the model on a plain `StaticCache` whose tensors they register as buffers; an exported program keeps only
        buffers between calls, so the senses and keys of past positions need buffers of their own. Assigning the LM
        model a generation config with `cache_implementation="static"` (what those exporters require) calls this
        with its `cache_config`'s sizes (default 1 row of `n_positions`). Not saved; any smaller cache fits.
        """
        max_cache_len = max_cache_len or self.config.n_positions
        parameter = self.gpt2_model.wte.weight
        self.sense_buffers = SenseBuffers(batch_size, max_cache_len, self.config, parameter.dtype,
                                          None if parameter.device.type == "meta" else parameter.device)

    def _sense_layer(self, cache: Cache) -> DynamicLayer | StaticLayer | tuple[torch.Tensor, torch.Tensor]:
        """The sense layer of `cache`; while exporting with a plain `StaticCache`, this model's reserved buffers."""
        if type(cache) is StaticCache and torch.compiler.is_exporting():
            if self.sense_buffers is None:
                raise ValueError(
                    "exporting with a StaticCache needs the Backpack's sense buffers: set model.generation_config "
                    "= GenerationConfig(cache_implementation='static', cache_config={...}) before wrapping the "
                    "model, or call model.backpack.reserve_sense_buffers(batch_size, max_cache_len)"
                )
            layer = cache.layers[0]
            return self.sense_buffers.view_for(layer.keys.shape[0], layer.max_cache_len)
        return sense_layer_of(cache)

    def _check_inputs(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        past_length: int | torch.Tensor,
        cache: Cache | None,
        ids_checked: bool = False,
        position_ids: torch.LongTensor | None = None,
    ) -> None:
        """Clear errors for what would otherwise fail deep inside (or, on CUDA, as a device-side assert).

        Only shapes are checked on every call. Token ids are checked where it costs no device round trip: on CPU
        tensors, and on CUDA once per sequence (at the prefill, which covers `generate()`, whose later tokens are
        the model's own), never inside a decoding step or a compiled graph, nor when `ids_checked` (a distinct-word
        list built on the host, which checked them there) or on the meta device (shapes only, no values).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (batch, seq) and inputs_embeds (batch, seq, n_embd)")
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}")
        if inputs_embeds is not None and (inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.embed_dim):
            raise ValueError(
                f"inputs_embeds must have shape (batch, seq, n_embd={self.embed_dim}), got {tuple(inputs_embeds.shape)}"
            )
        given = input_ids if input_ids is not None else inputs_embeds
        batch_size, query_length = given.shape[:2]
        if query_length == 0:
            name = "input_ids" if input_ids is not None else "inputs_embeds"
            raise ValueError(f"empty input: {name} has shape {tuple(given.shape)}; give at least one token")
        static = isinstance(cache, StaticCache)
        prefill = not cache.layers[0].is_initialized if static else cache is None or past_length == 0
        read_ids = input_ids is not None and not ids_checked and input_ids.device.type != "meta"
        if read_ids and not torch.compiler.is_compiling() and (input_ids.device.type == "cpu" or prefill):
            if input_ids.device.type == "cpu":  # read from host memory: no device op at all
                values = input_ids.detach().numpy()
                low, high = int(values.min()), int(values.max())
            else:  # one round trip per sequence
                low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= self.config.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(
                    f"input_ids contains token id {bad}, outside the vocabulary [0, {self.config.vocab_size})"
                )
        if static:
            # The cached length is on the device; the buffer's size bounds it (checked per generate() as well).
            if query_length > cache.layers[0].max_cache_len:
                raise ValueError(f"{query_length} new tokens do not fit a static cache of "
                                 f"{cache.layers[0].max_cache_len} positions")
            return
        total_length = past_length + query_length
        if total_length > self.config.n_positions and past_length == 0 and position_ids is not None:
            # A packed row holds several sequences (position_ids restart), each as long as n_positions at most.
            # Read only for rows that are refused otherwise; unreadable values (compiled, meta) pass.
            readable = not torch.compiler.is_compiling() and position_ids.device.type != "meta"
            longest = int(position_ids.max()) + 1 if readable else 0
            if longest > self.config.n_positions:
                raise ValueError(
                    f"a sequence of length {longest} (position_ids up to {longest - 1}) exceeds n_positions="
                    f"{self.config.n_positions}, the longest sequence this model can read"
                )
        elif total_length > self.config.n_positions:
            raise ValueError(
                f"sequence length {total_length} (cached {past_length} + new {query_length}) exceeds "
                f"n_positions={self.config.n_positions}, the longest sequence this model can read"
            )
        if attention_mask is not None and attention_mask.dim() == 2 and tuple(attention_mask.shape) != (
            batch_size, total_length
        ):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch, cached + new tokens) = "
                f"{(batch_size, total_length)}"
            )

    def _check_distinct_words(
        self,
        input_ids: torch.LongTensor | None,
        sense_index: torch.LongTensor | None,
        sense_words: torch.LongTensor | None,
        word_senses: torch.Tensor | None,
    ) -> None:
        """Shapes of the distinct-word arguments: an index per position into either a word list or a sense table."""
        if sense_index is None:
            if sense_words is not None or word_senses is not None:
                raise ValueError("sense_words and word_senses need sense_index (batch, seq): each position's row")
            return
        if input_ids is None:
            raise ValueError("sense_index needs input_ids: distinct words are token ids, not inputs_embeds")
        if tuple(sense_index.shape) != tuple(input_ids.shape):
            raise ValueError(f"sense_index has shape {tuple(sense_index.shape)}, expected input_ids' "
                             f"{tuple(input_ids.shape)}")
        if (sense_words is None) == (word_senses is None):
            raise ValueError("with sense_index pass exactly one of sense_words (words,) and word_senses (words, k, d)")
        if sense_words is not None and sense_words.dim() != 1:
            raise ValueError(f"sense_words must have shape (words,), got {tuple(sense_words.shape)}")
        expected = (self.num_senses, self.embed_dim)
        if word_senses is not None and (word_senses.dim() != 3 or tuple(word_senses.shape[1:]) != expected):
            raise ValueError(f"word_senses must have shape (words, {expected[0]}, {expected[1]}), got "
                             f"{tuple(word_senses.shape)}")

    def _cache_for_call(self, cache: Cache | None, use_cache: bool | None) -> Cache | None:
        """The cache this call reads and extends: the caller's, a new one, or none (`use_cache` off, or training
        with gradient checkpointing, whose replay would write the cache twice)."""
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if not use_cache:
            return None
        return cache if cache is not None else BackpackDynamicCache(config=self.config)

    def _masks(
        self,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: Cache | None,
        past_length: int | torch.Tensor,
        word_embeddings: torch.Tensor,
        kwargs: dict,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, dict]:
        """Which keys each query may see: `allowed` for the sense sum, and GPT-2's mask (with its arguments).

        A mask is needed for padding, for a static cache's unused slots, for several new tokens after cached ones
        and for packed rows (several sequences told apart by `position_ids`); otherwise causality from position 0
        (or one new token seeing every key) says it all, `allowed` is None and the fused kernels run unmasked.
        GPT-2's attention gets this very mask too, so that both see the same boundaries: built here from shapes
        (and, for a packed row, its boundaries, read once before anything is cached), it spares GPT-2's own mask
        builder a device round trip per step.

        Shapes: allowed (batch | 1, 1, query, key) boolean or None; GPT-2's mask as `_contextualization_mask`.
        """
        static = isinstance(cache, StaticCache)
        batch_size, query_length = word_embeddings.shape[:2]
        sequence_ids = None
        if attention_mask is None and not static and isinstance(past_length, int) and past_length == 0:
            sequence_ids = packed_sequence_ids(position_ids, batch_size)
        key_length = cache.layers[0].max_cache_len if static else past_length + query_length
        query_positions = past_length + torch.arange(query_length, device=word_embeddings.device)
        allowed = None
        if (attention_mask is not None or static or sequence_ids is not None
                or (cache is not None and past_length > 0 and query_length > 1)):
            allowed = sense_attention_mask(attention_mask, query_positions, key_length, sequence_ids)
        if sequence_ids is not None or (attention_mask is not None and attention_mask.dim() == 2):
            gpt2_mask, kwargs = self._contextualization_mask(
                allowed, attention_mask, sequence_ids, position_ids, word_embeddings.dtype, kwargs)
            return allowed, gpt2_mask, kwargs
        return allowed, attention_mask, kwargs

    def _contextualization_mask(
        self,
        allowed: torch.Tensor,
        attention_mask: torch.Tensor | None,
        sequence_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        dtype: torch.dtype,
        kwargs: dict,
    ) -> tuple[torch.Tensor | None, dict]:
        """GPT-2's attention mask (and attention arguments) for a padded or packed batch: the sense sum's own.

        sdpa takes `allowed` as it is and eager as an additive mask. Flash attention takes no 4D mask: a padded
        batch keeps its 2D mask, and a packed row runs the variable-length kernel over its sequences, whose
        boundaries transformers reads from `position_ids` (given per-sequence lengths `cu_seq_lens_*` win).
        """
        implementation = self.config._attn_implementation
        if implementation == "sdpa":
            return allowed, kwargs
        if implementation == "eager":
            return torch.zeros_like(allowed, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min), kwargs
        if sequence_ids is None or "cu_seq_lens_q" in kwargs or torch.compiler.is_compiling():
            return attention_mask, kwargs
        # transformers infers the lengths of a single packed row itself; every row's, flattened, are given here.
        (cu_seq_lens_q, cu_seq_lens_k), (max_length_q, max_length_k) = prepare_fa_kwargs_from_position_ids(
            position_ids.expand_as(sequence_ids))
        return None, {**kwargs, "cu_seq_lens_q": cu_seq_lens_q, "cu_seq_lens_k": cu_seq_lens_k,
                      "max_length_q": int(max_length_q), "max_length_k": int(max_length_k)}

    def _reweight_senses(
        self,
        senses: torch.Tensor,
        sense_weights: SenseWeights,
        input_ids: torch.LongTensor | None,
        past_length: int | torch.Tensor,
    ) -> torch.Tensor:
        """C(x_j)[ℓ] · δ[ℓ, j]: the senses of every key position scaled by `sense_weights`.

        Scaling the values by δ is scaling α[ℓ, i, j] by δ[ℓ, j], since o is linear in both. Shapes: senses
        (batch, k, key, d), δ broadcastable to (batch, k, cached + new) -> (batch, k, key, d); on a static cache
        the slots past the sequence are masked anyway, so δ is padded with ones to the buffer's size.
        """
        weights = sense_weights(input_ids, past_length) if callable(sense_weights) else sense_weights
        weights = torch.as_tensor(weights, device=senses.device).to(senses.dtype)
        # One device read per call, paid only by steered generation (never by a plain decoding step): a NaN here
        # would silently turn every logit into NaN.
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(weights).all()):
            raise ValueError("sense_weights contains NaN or inf")
        batch_size, num_senses, key_length, _ = senses.shape
        if weights.dim() and weights.shape[-1] not in (1, key_length):
            weights = F.pad(weights, (0, key_length - weights.shape[-1]), value=1.0)
        return senses * weights.expand(batch_size, num_senses, key_length)[..., None]

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        sense_weights: SenseWeights | None = None,
        output_contextualization: bool = False,
        output_senses: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        sense_index: torch.LongTensor | None = None,
        sense_words: torch.LongTensor | None = None,
        word_senses: torch.Tensor | None = None,
        **kwargs,
    ) -> BackpackGPT2BaseModelOutput | tuple:
        """Backpack output `o` for `input_ids` (or `inputs_embeds`), continuing from `cache` if given.

        Args:
            input_ids: (batch, seq) token ids.
            attention_mask: (batch, cached + seq), 1 for tokens and 0 for padding (left or right); or a 4D mask
                (batch, 1, seq, key) prepared for GPT-2's attention, as `generate()` does for a static cache.
            position_ids: (batch, seq); by default counted from the first non-padding token of a 2D mask. Positions
                that restart within a row (no padding mask, nothing cached yet) mark packed sequences: each sees
                only itself, and each, not the row, must fit `n_positions`. A cache filled by such a row continues
                the row as one sequence.
            cache: A cache from an earlier call (`past_key_values` is the same, by its old name); a plain
                `DynamicCache` or `StaticCache` keeps its class and holds the Backpack's sense layer as an attribute.
            inputs_embeds: (batch, seq, d) instead of `input_ids`: rows of the word embedding E, or any vectors
                (soft prompts). The senses are then C = SenseNetwork(inputs_embeds), which equals the ids path when
                the rows are E's.
            sense_weights: δ multiplying α[ℓ, i, j] per (sense, key): a tensor broadcastable to
                (batch, k, cached + seq), or a callable `(input_ids, past_length) -> tensor` called each step.
                The cache keeps the senses unweighted.
            output_contextualization: also return α (batch, k, seq, key).
            output_senses: also return the senses of every key position (batch, k, key, d).
            output_attentions, output_hidden_states: GPT-2's attention maps / states (default: the config's).
            return_dict: False for a tuple instead of the output object (default: the config's), as transformers'
                `can_return_tuple` reads it.
            sense_index: (batch, seq), with `sense_words` or `word_senses`: run the sense network once per distinct
                word (training's path; see `compute_senses`). Position j's senses are row `sense_index[j]` of the
                table `C(sense_words)` (words,) computed in this call, or of `word_senses` (words, k, d) computed
                earlier with `word_senses()` (one table for several micro-batches). The list's builder checks the
                token ids on the host, so this call reads none back from the device.
        """
        cache = self._cache_for_call(cache if cache is not None else past_key_values, use_cache)
        past_length = self._past_length(cache)
        self._check_distinct_words(input_ids, sense_index, sense_words, word_senses)
        self._check_inputs(input_ids, inputs_embeds, attention_mask, past_length, cache,
                           ids_checked=sense_index is not None, position_ids=position_ids)
        attention_mask = unpadded_as_none(attention_mask, past_length, isinstance(cache, StaticCache))
        word_embeddings = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        query_length = word_embeddings.shape[1]
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            # Left padding: positions count from each row's first real token, as GPT-2 was trained.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -query_length:]
        allowed, gpt2_mask, kwargs = self._masks(attention_mask, position_ids, cache, past_length, word_embeddings,
                                                 kwargs)

        # 1. Senses C(x_j) of the new tokens: (batch, k, seq, d).
        senses = self.compute_senses(input_ids, inputs_embeds, sense_index, sense_words, word_senses)

        # 2. Contextualization: GPT-2 states -> per-sense queries and keys. GPT-2 gets the embeddings rather than
        # the ids: the same E x, looked up once, and no padding heuristic that would read token ids back. Output
        # flags left unset take the config's defaults in GPT-2's own forward.
        flags = {name: value for name, value in (("output_attentions", output_attentions),
                                                  ("output_hidden_states", output_hidden_states)) if value is not None}
        contextual = self.gpt2_model(
            inputs_embeds=word_embeddings,
            attention_mask=gpt2_mask,
            position_ids=position_ids,
            use_cache=cache is not None,
            **{CACHE_ARGUMENT: cache},
            **flags,
            **kwargs,
        )
        queries, keys = self.sense_weight_net(contextual.last_hidden_state)
        if cache is not None:
            keys, senses = update_sense_layer(self._sense_layer(cache), keys, senses, past_length)
        values = senses if sense_weights is None else self._reweight_senses(senses, sense_weights, input_ids,
                                                                             past_length)

        # 3. Weighted sum o = Σ_ℓ α[ℓ] @ C[ℓ]: fused, unless α itself is wanted.
        hidden_states, contextualization = sense_sum(
            queries, keys, values, allowed, self.sense_weight_net.scaling, past_length,
            materialize=output_contextualization or self.config._attn_implementation == "eager",
            decoding_step=cache is not None and query_length == 1,
        )
        return BackpackGPT2BaseModelOutput(
            last_hidden_state=hidden_states,
            cache=cache,
            hidden_states=contextual.hidden_states,
            attentions=contextual.attentions,
            contextualization=contextualization if output_contextualization else None,
            senses=senses if output_senses else None,
        )


class BackpackGPT2LMHeadModel(BackpackGPT2PreTrainedModel, GenerationMixin):
    """Backpack GPT-2 language model: logits = E o, with E tied to the word embedding.

    Works with `generate()` (greedy, sampling, beam search, assisted decoding; left-padded batches; the default
    or a static cache, compiled or not) and `pipeline("text-generation")`. Sense-level control lives here too:
    `sense_vectors`, `sense_logits`, `set_sense_edit` / `remove_sense_edits`, and the `sense_weights` argument.
    """

    _tied_weights_keys = {"lm_head.weight": "backpack.gpt2_model.wte.weight"}

    def __init__(self, config: BackpackGPT2Config):
        super().__init__(config)
        self.backpack = BackpackGPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.loss_type = "ForCausalLM"  # transformers reads the loss from the class name, which does not say it
        self.post_init()

    @property
    def generation_config(self) -> GenerationConfig | None:
        """The default generation settings (transformers' attribute)."""
        return self.__dict__.get("_generation_config")

    @generation_config.setter
    def generation_config(self, generation_config: GenerationConfig | None) -> None:
        # transformers' exporters require a static-cache generation config and then build the cache themselves:
        # reserve the sense buffers the exported program needs (see `BackpackGPT2Model.reserve_sense_buffers`).
        self.__dict__["_generation_config"] = generation_config
        if getattr(generation_config, "cache_implementation", None) == "static" and "backpack" in self._modules:
            sizes = generation_config.cache_config or {}
            self.backpack.reserve_sense_buffers(sizes.get("batch_size", 1), sizes.get("max_cache_len"))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backpack.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.backpack.set_input_embeddings(new_embeddings)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs):
        """transformers' cache for `generate()`, given the Backpack's sense layer before any (compiled) forward."""
        prepared = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        for name in ("cache", "past_key_values"):
            if model_kwargs.get(name) is None:
                continue
            cache = model_kwargs[name] = as_backpack_cache(model_kwargs[name])
            if isinstance(cache, StaticCache) and generation_config.max_length > self.config.n_positions:
                raise ValueError(
                    f"generate() would reach {generation_config.max_length} tokens, past n_positions="
                    f"{self.config.n_positions}, the longest sequence this model can read: lower max_new_tokens"
                )
        return prepared

    # --- 4. logits ------------------------------------------------------------------------------------------

    @can_return_tuple
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
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        sense_weights: SenseWeights | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        sense_index: torch.LongTensor | None = None,
        sense_words: torch.LongTensor | None = None,
        word_senses: torch.Tensor | None = None,
        **kwargs,
    ) -> BackpackGPT2LMHeadModelOutput | tuple:
        """Logits `E o` (batch, seq, vocab); with `labels`, the mean next-token cross-entropy.

        `labels` are shifted inside (pass `labels=input_ids`); -100 is ignored. `logits_to_keep=n` computes only
        the last n positions' logits (what `generate()` needs). Other arguments (among them the distinct-word
        senses `sense_index` with `sense_words` or `word_senses`): see [`BackpackGPT2Model.forward`].
        """
        outputs = self.backpack(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            use_cache=use_cache,
            inputs_embeds=inputs_embeds,
            sense_weights=sense_weights,
            output_contextualization=output_contextualization,
            output_senses=output_senses,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            sense_index=sense_index,
            sense_words=sense_words,
            word_senses=word_senses,
            **kwargs,
        )
        # As transformers' GPT-2: 0 keeps every position, n the last n, a tensor the positions it lists.
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, slice_indices])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)

        return BackpackGPT2LMHeadModelOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            contextualization=outputs.contextualization,
            senses=outputs.senses,
        )

    # --- sense-level readout and control --------------------------------------------------------------------

    def _token_ids(self, token_ids: Iterable[int] | torch.Tensor) -> torch.LongTensor:
        """1-D LongTensor of token ids on the model's device, checked against the vocabulary."""
        ids = torch.as_tensor(list(token_ids) if not isinstance(token_ids, torch.Tensor) else token_ids)
        ids = ids.reshape(-1).to(dtype=torch.long)
        if ids.numel() == 0:
            raise ValueError("no token ids given")
        bad = ids[(ids < 0) | (ids >= self.config.vocab_size)]
        if bad.numel():
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary [0, {self.config.vocab_size})")
        return ids.to(self.device)

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


# PEFT `target_modules` (regular expressions over module names). PEFT's default for GPT-2, ["c_attn"], would also
# adapt the contextualization layer `sense_weight_net.c_attn`, an nn.Linear among Conv1Ds.
LORA_TARGET_MODULES = {
    "attention": r".*gpt2_model\.h\.\d+\.attn\.c_attn",  # GPT-2's attention projections: how words are combined
    "senses": r".*sense_network\..*\.(c_fc|c_proj)",  # the sense network's MLPs: what each word's senses are
    "attention_and_senses": r".*(gpt2_model\.h\.\d+\.attn\.c_attn|sense_network\..*\.(c_fc|c_proj))",
}

__all__ = [
    "CACHE_ARGUMENT",
    "LORA_TARGET_MODULES",
    "BackpackDynamicCache",
    "BackpackGPT2LMHeadModel",
    "BackpackGPT2Model",
    "BackpackGPT2PreTrainedModel",
    "BackpackStaticCache",
]

# `save_pretrained` then writes `auto_map` and copies this file and the configuration beside the weights.
BackpackGPT2LMHeadModel.register_for_auto_class("AutoModelForCausalLM")
# Once this module is imported, the Auto classes and `pipeline` know the Backpack: a loaded model is accepted for
# text generation, and `AutoModelForCausalLM.from_pretrained(folder)` uses these classes without remote code.
AutoModelForCausalLM.register(BackpackGPT2Config, BackpackGPT2LMHeadModel, exist_ok=True)
