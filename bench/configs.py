"""Model sizes and benchmark sizes: which models are compared, on how much input, how many times."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from configuration_backpack_gpt2 import BackpackGPT2Config
from modeling_backpack_gpt2 import BackpackGPT2LMHeadModel

# Paper, Table 9 (plus "tiny", small enough for the smoke test). All Backpacks use 16 senses.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"n_embd": 128, "n_layer": 2, "n_head": 2},
    "micro": {"n_embd": 384, "n_layer": 6, "n_head": 6},
    "mini": {"n_embd": 640, "n_layer": 8, "n_head": 8},
    "small": {"n_embd": 768, "n_layer": 12, "n_head": 12},
}
NUM_SENSES = 16
VOCAB_SIZE = 50264  # GPT-2's 50,257 subwords padded to a multiple of 8, as published
BASE_POSITIONS = 512


def backpack_config(name: str, n_positions: int = BASE_POSITIONS, attn: str = "sdpa") -> BackpackGPT2Config:
    """Backpack configuration of a named size."""
    return BackpackGPT2Config(
        num_senses=NUM_SENSES, vocab_size=VOCAB_SIZE, n_positions=n_positions, attn_implementation=attn,
        **MODEL_SIZES[name],
    )


def gpt2_config(name: str, n_positions: int = BASE_POSITIONS, attn: str = "sdpa") -> GPT2Config:
    """The matched Transformer: GPT-2 with the Backpack's contextualization-network size.

    `scale_attn_by_inverse_layer_idx` matches the Backpack's (published) setting so that the GPT-2 stacks are
    identical.
    """
    return GPT2Config(
        vocab_size=VOCAB_SIZE, n_positions=n_positions, scale_attn_by_inverse_layer_idx=True,
        attn_implementation=attn, **MODEL_SIZES[name],
    )


def build_models(
    name: str, n_positions: int, attn: str, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> tuple[BackpackGPT2LMHeadModel, GPT2LMHeadModel]:
    """A randomly initialised (Backpack, GPT-2) pair of the named size, in eval mode.

    Random weights are fine for timing: no operation's cost depends on the values (greedy generation is forced
    to its full length).
    """
    torch.manual_seed(seed)
    backpack = BackpackGPT2LMHeadModel(backpack_config(name, n_positions, attn))
    gpt2 = GPT2LMHeadModel(gpt2_config(name, n_positions, attn))
    return backpack.to(device=device, dtype=dtype).eval(), gpt2.to(device=device, dtype=dtype).eval()


def parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


@dataclass
class BenchSizes:
    """How much input each measurement uses and how often it repeats.

    The CPU defaults are scaled down from the paper's 32 x 512 so that a full run takes minutes on 2 cores;
    ratios are what is compared, and both models always get the same input.
    """

    forward_batch: int = 8
    seq: int = 512
    train_batch: int = 4
    generate_batches: tuple[int, ...] = (1, 8)
    prompt_len: int = 16
    new_tokens: int = 512
    recompute_batches: tuple[int, ...] = (1,)  # the full-recompute loop is O(N^2): batch 1 only on CPU
    latency_positions: tuple[int, int] = (64, 512)
    memory_seqs: tuple[int, ...] = (512, 1024)
    memory_batch: int = 4
    memory_paths: tuple[str, ...] = ("fused", "materialized", "gpt2")  # gpt2: reference only
    warmup: int = 1
    reps: int = 5
    generate_reps: int = 3
    latency_reps: int = 30
    table7_configs: tuple[str, ...] = ("micro", "mini", "small")
    table7_batch: int = 32
    table7_reps: int = 100
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def default_sizes(quick: bool, device: str) -> BenchSizes:
    """Benchmark sizes for a device; `quick` is the CI smoke test (< 3 minutes on 2 CPU cores, micro)."""
    if device == "cuda":
        sizes = BenchSizes(
            forward_batch=32, train_batch=32, recompute_batches=(1, 8), memory_batch=8, reps=10, generate_reps=3,
            latency_reps=50,
        )
        if quick:
            sizes.reps, sizes.table7_reps, sizes.table7_configs = 5, 10, ("micro",)
        return sizes
    if not quick:
        return BenchSizes(
            forward_batch=4, train_batch=2, reps=4, generate_reps=2, memory_batch=2,
            memory_paths=("fused", "materialized"),
            notes=["CPU: forward batch 4 x 512 and train batch 2 x 512 instead of the paper's 32 x 512"],
        )
    return BenchSizes(
        forward_batch=2, seq=256, train_batch=2, generate_batches=(1, 8), new_tokens=64, latency_reps=10,
        memory_seqs=(1024,), memory_batch=1, memory_paths=("fused", "materialized"), reps=3, generate_reps=2,
        notes=["--quick: batch 2 x 256 for forward/train, 64 new tokens, 3 repetitions, memory at 1 x 1024 only; "
               "ratios are indicative only"],
    )
