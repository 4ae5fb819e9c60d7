"""The model being trained: a Backpack GPT-2, or the plain GPT-2 Transformer of the same size for comparison."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel

from train.config import TrainArguments


def model_config(args: TrainArguments, eos_token_id: int = 50256) -> GPT2Config:
    """The model's configuration; the GPT-2 baseline gets exactly the Backpack's contextualization network."""
    shape = dict(
        vocab_size=args.vocab_size, n_positions=args.n_positions, n_embd=args.n_embd, n_layer=args.n_layer,
        n_head=args.n_head, resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout,
        scale_attn_by_inverse_layer_idx=True, bos_token_id=eos_token_id, eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    if args.model == "gpt2":
        return GPT2Config(**shape)
    from configuration_backpack_gpt2 import BackpackGPT2Config

    return BackpackGPT2Config(num_senses=args.num_senses, sense_intermediate_scale=args.sense_intermediate_scale,
                              **shape)


def build_model(args: TrainArguments) -> PreTrainedModel:
    """A freshly initialised model (seed the RNG first for a reproducible start)."""
    config = model_config(args)
    if args.model == "gpt2":
        model = GPT2LMHeadModel(config)
    else:
        from modeling_backpack_gpt2 import BackpackGPT2LMHeadModel

        model = BackpackGPT2LMHeadModel(config)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.max_length = args.n_positions  # the pipeline's default would run past the positions
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
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


def count_parameters(model: torch.nn.Module) -> int:
    """Unique trainable parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
