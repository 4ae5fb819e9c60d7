"""The model being trained: a Backpack GPT-2, or the plain GPT-2 Transformer of the same size for comparison."""

from __future__ import annotations

import torch
from transformers import GPT2LMHeadModel, PretrainedConfig, PreTrainedModel

from backpack_train.config import TrainArguments
from configuration_backpack_gpt2 import GPT2_END_OF_TEXT, BackpackGPT2Config
from modeling_backpack_gpt2 import BackpackGPT2LMHeadModel

# The run's shape: its named size with every key the run gives (a config file or a flag) on top.
SHAPE_KEYS = ("n_embd", "n_layer", "n_head", "n_positions", "num_senses", "sense_intermediate_scale", "vocab_size")


def model_config(args: TrainArguments, eos_token_id: int = GPT2_END_OF_TEXT) -> PretrainedConfig:
    """The model's configuration; the GPT-2 baseline is exactly the Backpack's contextualization network.

    `eos_token_id` (GPT-2's <|endoftext|>) separates documents and starts and ends text. No pad token in the
    config: packed blocks have none, and a config pad id would make GPT-2 scan every batch for it; `build_model`
    puts EOS in the generation config, where padding happens.
    """
    shape = {key: getattr(args, key) for key in SHAPE_KEYS if getattr(args, key) is not None}
    backpack = BackpackGPT2Config.from_size(
        args.size, **shape, resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id,
    )
    return backpack.contextualization_config() if args.model == "gpt2" else backpack


def build_model(args: TrainArguments) -> PreTrainedModel:
    """A freshly initialised model (seed the RNG first for a reproducible start)."""
    config = model_config(args)
    model = GPT2LMHeadModel(config) if args.model == "gpt2" else BackpackGPT2LMHeadModel(config)
    model.generation_config.pad_token_id = config.eos_token_id
    if args.gradient_checkpointing:
        # transformers 5.24 renamed it; the old name still works there, with a FutureWarning.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    return model


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: decay on matrices (weights, embeddings), none on biases and LayerNorm weights."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, args: TrainArguments) -> torch.optim.AdamW:
    """AdamW as in the paper (default betas), with decoupled weight decay on matrices only."""
    return torch.optim.AdamW(optimizer_groups(model, args.weight_decay), lr=args.learning_rate,
                             betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
