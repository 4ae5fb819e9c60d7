"""Pretraining Backpack GPT-2 (and its GPT-2 baseline) with Accelerate; entry points pretrain.py and evaluate.py."""
