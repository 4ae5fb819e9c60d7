"""Backpack GPT-2 toolkit: tokenizer, sense readout, explanations, interventions and evaluations."""

from .tokenizer import gpt2_tokenizer

__all__ = ["gpt2_tokenizer"]
