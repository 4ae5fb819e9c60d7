"""Shared test fixtures: the reference data beside the checkout, and tiny random Backpacks."""

import functools
import os
import shutil
from pathlib import Path

import pytest
import torch

from configuration_backpack_gpt2 import BackpackGPT2Config
from modeling_backpack_gpt2 import BackpackGPT2LMHeadModel

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BACKPACK_SHARED", REPO.parent / "shared"))
REFERENCE = SHARED / "reference" / "backpack-gpt2"
TINY_CHECKPOINT = SHARED / "fixtures" / "backpack-tiny"
MODEL_FILES = ("configuration_backpack_gpt2.py", "modeling_backpack_gpt2.py")


def tiny_config(**overrides) -> BackpackGPT2Config:
    """A Backpack small enough for CPU tests, with every dropout off unless overridden."""
    settings = dict(
        vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=2, num_senses=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    settings.update(overrides)
    return BackpackGPT2Config(**settings)


def tiny_model(seed: int = 0, **overrides) -> BackpackGPT2LMHeadModel:
    """A random tiny Backpack in eval mode, its weights scaled up so that predictions are far from uniform."""
    torch.manual_seed(seed)
    model = BackpackGPT2LMHeadModel(tiny_config(**overrides))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1 and "wpe" not in name:
                parameter.mul_(8.0)
    return model.eval()


def save_tiny_folder(path: Path) -> str:
    """A tiny random Backpack with GPT-2's vocabulary and tokenizer saved to `path`, as the toolkit loads folders."""
    from backpack.tokenizer import gpt2_tokenizer

    torch.manual_seed(0)
    config = BackpackGPT2Config(n_embd=32, n_layer=2, n_head=2, num_senses=4, n_positions=64, initializer_range=0.1)
    BackpackGPT2LMHeadModel(config).save_pretrained(path)
    gpt2_tokenizer().save_pretrained(path)
    return str(path)


def hub_folder(source: Path, destination: Path) -> Path:
    """`source` laid out the way the Hub serves a remote-code model: weights + config + the two code files."""
    shutil.copytree(source, destination, dirs_exist_ok=True)
    for name in MODEL_FILES:
        shutil.copy(REPO / name, destination / name)
    return destination


@functools.cache
def _expected_outputs() -> dict:
    return torch.load(TINY_CHECKPOINT / "expected.pt", weights_only=True)


@pytest.fixture
def expected() -> dict:
    """The published implementation's float64 outputs on the tiny checkpoint (read once per test run)."""
    return _expected_outputs()
