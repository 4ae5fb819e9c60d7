"""Backpack GPT-2 toolkit: tokenizer, sense readout, explanations, interventions and evaluations."""

from .bias import BiasReport, evaluate_bias
from .explain import Explanation, explain_prediction
from .interventions import (
    Intervention,
    active_interventions,
    knowledge_edit,
    predicted_scale_effect,
    remove_all_interventions,
    scale_sense,
    zero_sense,
)
from .senses import SenseReadout, read_senses, sense_logits, sense_vectors
from .similarity import SimilarityResult, similarity_table
from .tokenizer import gpt2_tokenizer
from .topic import TOPIC_BAGS, TopicController, bag_token_ids
from .words import ResolvedWord, load_model, resolve_word

__all__ = [
    "TOPIC_BAGS",
    "BiasReport",
    "Explanation",
    "Intervention",
    "ResolvedWord",
    "SenseReadout",
    "SimilarityResult",
    "TopicController",
    "active_interventions",
    "bag_token_ids",
    "evaluate_bias",
    "explain_prediction",
    "gpt2_tokenizer",
    "knowledge_edit",
    "load_model",
    "predicted_scale_effect",
    "read_senses",
    "remove_all_interventions",
    "resolve_word",
    "scale_sense",
    "sense_logits",
    "sense_vectors",
    "similarity_table",
    "zero_sense",
]
