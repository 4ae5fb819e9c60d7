"""Model sizes and benchmark sizes: which models are compared, on how much input, how many times."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from configuration_backpack_gpt2 import MODEL_SIZES as REGISTERED_SIZES
from configuration_backpack_gpt2 import TEST_SIZES, BackpackGPT2Config
from modeling_backpack_gpt2 import BackpackGPT2LMHeadModel

# The sizes `BackpackGPT2Config.from_size` knows: the registry's (paper Table 9, plus nano) and tiny for smoke runs.
# Every Backpack has 16 senses and GPT-2's padded vocabulary (the configuration's defaults).
MODEL_SIZES: dict[str, dict[str, int]] = {**REGISTERED_SIZES, **TEST_SIZES}
BASE_POSITIONS = 512


def backpack_config(name: str, n_positions: int = BASE_POSITIONS, attn: str = "sdpa") -> BackpackGPT2Config:
    """Backpack configuration of a named size, reading `n_positions` positions."""
    return BackpackGPT2Config.from_size(name, n_positions=n_positions, attn_implementation=attn)


def gpt2_config(name: str, n_positions: int = BASE_POSITIONS, attn: str = "sdpa") -> GPT2Config:
    """The matched Transformer: exactly the Backpack's contextualization network (`contextualization_config`)."""
    return backpack_config(name, n_positions, attn).contextualization_config()


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
    gpt2.loss_type = "ForCausalLM"  # transformers reads it from the class name, which does not say it
    return backpack.to(device=device, dtype=dtype).eval(), gpt2.to(device=device, dtype=dtype).eval()


def meta_models(name: str, n_positions: int) -> tuple[BackpackGPT2LMHeadModel, GPT2LMHeadModel]:
    """The (Backpack, GPT-2) pair of the named size on the meta device: shapes without storage, for counting FLOPs
    of any size in seconds."""
    with torch.device("meta"):
        backpack = BackpackGPT2LMHeadModel(backpack_config(name, n_positions))
        gpt2 = GPT2LMHeadModel(gpt2_config(name, n_positions))
    gpt2.loss_type = "ForCausalLM"
    return backpack, gpt2


@dataclass
class BenchSizes:
    """How much input each measurement uses and how often it repeats.

    The CPU defaults are scaled down from the paper's 32 x 512 so that a full run takes minutes on 2 cores;
    ratios are what is compared, and both models always get the same input.
    """

    forward_batch: int = 8
    seq: int = 512
    train_batch: int = 4
    train_micro_batches: int = 1  # micro-batches of train_batch per trainer step (train_compiled)
    train_cost_tokens: int = 131_072  # tokens per process per optimizer step (train_cost), as the paper's 4 GPUs
    train_cost_batch: int = 8  # sequences per micro-batch (train_cost): the trainer's default --batch_size
    generate_batches: tuple[int, ...] = (1, 8)
    prompt_len: int = 16
    new_tokens: int = 512
    recompute_batches: tuple[int, ...] = (1,)  # the full-recompute loop is O(N^2): batch 1 only on CPU
    latency_positions: tuple[int, int] = (64, 512)
    memory_seqs: tuple[int, ...] = (512, 1024)
    memory_batch: int = 4
    memory_paths: tuple[str, ...] = ("fused", "materialized", "gpt2")  # gpt2: reference only
    # the trainer section's steps: Backpack (distinct-word senses), Backpack per token, GPT-2
    trainer_candidates: tuple[str, ...] = ("backpack", "backpack_per_token", "gpt2")
    warmup: int = 1
    reps: int = 5
    generate_reps: int = 3
    latency_reps: int = 30
    table7_configs: tuple[str, ...] = ("micro", "mini", "small")
    table7_batch: int = 32
    table7_reps: int = 100
    notes: list[str] = field(default_factory=list)

    # The values a tuple-valued size may hold (`--size trainer_candidates=backpack,gpt2`).
    CHOICES = {"memory_paths": ("fused", "materialized", "gpt2"),
               "trainer_candidates": ("backpack", "backpack_per_token", "gpt2")}
    REQUIRED = {"trainer_candidates": ("backpack", "gpt2")}  # the ratio needs both

    def as_dict(self) -> dict:
        return asdict(self)


def default_sizes(quick: bool, device: str) -> BenchSizes:
    """Benchmark sizes for a device; `quick` is the CI smoke test (micro; ~6 minutes on 2 CPU cores)."""
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
