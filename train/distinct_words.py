"""The Backpack's sense network once per distinct word of an optimizer step, instead of once per token.

The senses C(x) depend on the word x alone, and text repeats words: a step of 131,072 tokens of the embedded
corpus (256 random blocks of 512, as the trainer draws them) holds about 13 % distinct words. The data side knows
every token id of a step before the device does, so the host lists the step's distinct words and each token's row
among them (:func:`plan_distinct_words`), and no `torch.unique` stalls the device or breaks a graph. For a compiled
forward that computes its own table (one per micro-batch, below) the list is padded to one of a few fixed sizes
(:func:`word_buckets`), so that it sees the same shapes step after step; otherwise the list is taken as it is
(padding would only add sense-network work).

Within an optimizer step of several micro-batches (:class:`DistinctWordSenses`):

    table  = C(E words)                   once per step: (words, k, d)
    rows_m = table[index_m], detached     micro-batches 1 .. M-1 read their positions' rows; their backward adds
                                          the rows' gradient into one (words, k, d) accumulator and stops there
    rows_M = (table + accumulator)[index] micro-batch M reads its rows from the table itself; its backward adds
                                          the accumulator and goes on through the sense network: one per step

so every parameter gets its gradient in the step's last backward, the one DDP synchronises. An earlier micro-batch
costs an index_add of its own positions' rows, not a (words, k, d) gradient of its own (zeroed and summed again in
every micro-batch: memory traffic that grows with the step's words). Under FSDP (which gathers parameters only
inside the model's forward), with one micro-batch per step, and where the trainer asks for it, each micro-batch
computes its own table inside its forward (``sense_words``) instead.

The sense network's dropout then draws one mask per (word, step) (per micro-batch when not shared), not per
token; with dropout 0 the gradients equal the per-token path's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

BUCKET_MULTIPLE = 64  # word-list sizes are multiples of this (matmul-friendly), except the cap
CALIBRATION_STEPS = 32  # sampled steps whose distinct-word counts set the smallest bucket
CALIBRATION_MARGIN = 1.05  # headroom above the largest sampled count, so that nearly every step fits it
CALIBRATED_GROWTH = 1.25  # above the calibrated size, a rare larger step pads to at most 25 % more than it needs


@dataclass
class WordPlan:
    """One step's distinct words (padded to a bucket size) and each micro-batch's index into them."""

    words: torch.LongTensor  # (bucket,) token ids; the padding repeats word 0 and is never indexed
    indices: list[torch.LongTensor]  # per micro-batch (batch, seq): row of `words` of each position
    distinct: int  # real words in `words`


def round_up(value: float, multiple: int = BUCKET_MULTIPLE) -> int:
    return int(math.ceil(value / multiple) * multiple)


def word_buckets(tokens: int, vocab_size: int, smallest: int | None = None, growth: float = 2.0) -> tuple[int, ...]:
    """The word-list sizes a step of `tokens` tokens may pad to: `smallest` (default 64), growing by `growth`
    (rounded up to a multiple of 64), up to the cap.

    The cap, min(tokens, vocab_size), holds any step. Each size is one static shape for a compiled forward, so a
    run compiles once per size it meets; a calibrated `smallest` (:func:`calibrated_buckets`) makes that one.
    """
    cap = min(tokens, vocab_size)
    size = min(round_up(smallest or BUCKET_MULTIPLE), cap)
    sizes = []
    while size < cap:
        sizes.append(size)
        size = round_up(size * growth)
    return (*sizes, cap)


def distinct_count(ids: np.ndarray) -> int:
    """Number of distinct token ids in an array."""
    return int(np.unique(ids).size)


def calibrated_buckets(step_counts: Sequence[int], tokens: int, vocab_size: int) -> tuple[int, ...]:
    """Buckets whose smallest size is 5 % above the largest distinct-word count of the sampled steps (rounded up
    to a multiple of 64), then 25 % steps up to the cap."""
    return word_buckets(tokens, vocab_size, round_up(max(step_counts) * CALIBRATION_MARGIN), CALIBRATED_GROWTH)


def sample_step_counts(blocks: np.ndarray | Callable[[np.ndarray], np.ndarray], num_blocks: int,
                       blocks_per_step: int, eos_token_id: int, seed: int,
                       steps: int = CALIBRATION_STEPS) -> list[int]:
    """Distinct input ids of `steps` random steps of `blocks_per_step` packed blocks (n + 1 tokens each).

    `blocks(indices)` returns those blocks as an int array (batch, n + 1); inputs are ``block[:-1]`` with the
    padding (-100) read as EOS, as the collator makes them.
    """
    generator = np.random.default_rng(seed)
    counts = []
    for _ in range(steps):
        chosen = np.sort(generator.choice(num_blocks, size=min(blocks_per_step, num_blocks), replace=False))
        inputs = np.asarray(blocks(chosen))[:, :-1]
        counts.append(distinct_count(np.where(inputs < 0, eos_token_id, inputs)))
    return counts


def dataset_buckets(dataset, blocks_per_step: int, vocab_size: int, eos_token_id: int, seed: int,
                    block_length: int) -> tuple[int, ...]:
    """Buckets for a packed training split: calibrated on sampled steps of a map-style dataset; a stream (whose
    steps cannot be sampled ahead) gets the plain doubling ladder."""
    tokens = blocks_per_step * (block_length - 1)
    if not hasattr(dataset, "__len__") or len(dataset) == 0:
        return word_buckets(tokens, vocab_size)
    table = dataset.with_format("numpy")
    counts = sample_step_counts(lambda indices: table[indices]["input_ids"], len(dataset), blocks_per_step,
                                eos_token_id, seed)
    return calibrated_buckets(counts, tokens, vocab_size)


def plan_distinct_words(host_ids: Sequence[np.ndarray], buckets: Sequence[int] | None, vocab_size: int,
                        device: torch.device | str = "cpu") -> WordPlan:
    """The distinct words of several micro-batches' input ids (host arrays) and each position's row, on `device`.

    O(tokens + vocab) with a presence table rather than a sort. The list is padded with word 0 to the smallest
    bucket that holds it; `buckets=None` leaves it as it is (eager steps: no static shape needed). Token ids
    outside [0, vocab_size) are an error here, on the host, which is why the model need not read the ids back from
    the device.
    """
    flat = np.concatenate([np.asarray(ids).reshape(-1) for ids in host_ids])
    if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= vocab_size):
        bad = int(flat.min()) if int(flat.min()) < 0 else int(flat.max())
        raise ValueError(f"input_ids contains token id {bad}, outside the vocabulary [0, {vocab_size})")
    present = np.zeros(vocab_size, dtype=bool)
    present[flat] = True
    words = np.flatnonzero(present)
    size = words.size if buckets is None else next((bucket for bucket in buckets if bucket >= words.size), None)
    if size is None:
        raise ValueError(f"{words.size} distinct words exceed the largest bucket ({max(buckets)})")
    row = np.zeros(vocab_size, dtype=np.int64)
    row[words] = np.arange(words.size)
    padded = np.zeros(size, dtype=np.int64)
    padded[: words.size] = words
    pin = torch.device(device).type == "cuda"

    def to_device(array: np.ndarray) -> torch.LongTensor:
        tensor = torch.from_numpy(array)
        return tensor.pin_memory().to(device, non_blocking=True) if pin else tensor.to(device)

    indices = [to_device(row[np.asarray(ids)]) for ids in host_ids]
    return WordPlan(words=to_device(padded), indices=indices, distinct=int(words.size))


class _StepTableRows(torch.autograd.Function):
    """A micro-batch's rows of the step's table, (batch, seq) index -> (batch·seq, k, d): forward a gather, backward
    an index_add of the rows' gradient into the step's accumulator (words, k, d); nothing flows further back."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.LongTensor, accumulator: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.accumulator = accumulator
        return table.index_select(0, index.flatten())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, None, None]:
        (index,) = ctx.saved_tensors
        ctx.accumulator.index_add_(0, index.flatten(), grad)
        return None, None, None


class _CarryStashedGradient(torch.autograd.Function):
    """Identity on the table, whose backward adds the gradient the step's earlier micro-batches accumulated."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, stashed: torch.Tensor) -> torch.Tensor:
        ctx.stashed = stashed
        return table.view_as(table)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad + ctx.stashed, None


class DistinctWordSenses:
    """The forward arguments that make a Backpack run its sense network once per distinct word of a step.

    Args:
        buckets: word-list sizes (:func:`word_buckets`), the same on every process, for compiled forwards; None
            for the exact lists (eager).
        vocab_size: the model's vocabulary (token ids are checked against it on the host).
        word_senses: the model's ``BackpackGPT2Model.word_senses`` (unwrapped), to share one table across the
            micro-batches of a step; None computes one table per micro-batch inside each forward.
        autocast: context for computing the shared table outside the model's forward (the trainer's
            ``accelerator.autocast``), so that it has the dtype the forward would give it.
    """

    def __init__(self, buckets: Sequence[int] | None, vocab_size: int,
                 word_senses: Callable[[torch.LongTensor], torch.Tensor] | None = None,
                 autocast: Callable[[], AbstractContextManager] = nullcontext):
        self.buckets = tuple(sorted(buckets)) if buckets is not None else None
        self.vocab_size = vocab_size
        self.word_senses = word_senses
        self.autocast = autocast
        self.last_plan: WordPlan | None = None  # for reports: the most recent step's word list
        # Rows the sense network has run on (bucket padding included), every step so far: its executed FLOPs.
        self.words_computed = 0

    def forward_arguments(self, micro_batches: Sequence[dict],
                          device: torch.device | str | None = None) -> Iterator[dict]:
        """Per micro-batch, the keyword arguments for the model's forward (``sense_index`` and a table source), on
        `device` (default: the CPU), one micro-batch at a time: take each when its forward runs.

        The token ids are read on the host: pass the CPU micro-batches, before they are moved to the device. With
        a shared table, the table is computed here (the sense network's forward for the step); an earlier
        micro-batch gets its own positions' rows as its table (``sense_index`` then counts its positions).
        """
        for batch in micro_batches:
            if batch["input_ids"].device.type != "cpu":
                raise ValueError("distinct-word senses read the token ids on the host: pass the CPU micro-batches "
                                 f"(moved to the device afterwards), not batches on {batch['input_ids'].device}")
        host = [batch["input_ids"].numpy() for batch in micro_batches]
        device = torch.device(device) if device is not None else torch.device("cpu")
        if self.word_senses is None or len(micro_batches) == 1:
            arguments = []
            for ids in host:
                plan = plan_distinct_words([ids], self.buckets, self.vocab_size, device)
                arguments.append({"sense_index": plan.indices[0], "sense_words": plan.words})
                self.words_computed += plan.words.numel()
            self.last_plan = plan
            return iter(arguments)
        plan = plan_distinct_words(host, self.buckets, self.vocab_size, device)
        self.last_plan = plan
        self.words_computed += plan.words.numel()
        with self.autocast():
            table = self.word_senses(plan.words)
            if device.type != "meta" and torch.is_autocast_enabled(device.type):  # float32 parameters: the table's
                table = table.float()  # gradient accumulates over the micro-batches in float32, as theirs does
        return _step_table_arguments(table, plan.indices)


def _step_table_arguments(table: torch.Tensor, indices: Sequence[torch.LongTensor]) -> Iterator[dict]:
    """The forward arguments of a step's micro-batches sharing `table` (words, k, d), made as each is taken, so
    that only the running micro-batch's rows are held. Every micro-batch gets its positions' rows (batch·seq, k, d)
    and ``sense_index`` counting them: one shape whatever the step's word count, so a compiled forward never
    recompiles for it."""
    accumulator = torch.zeros_like(table)
    detached = table.detach().requires_grad_()  # requires grad only so that the rows' backward runs
    for number, index in enumerate(indices, start=1):
        if number < len(indices):
            rows = _StepTableRows.apply(detached, index, accumulator)
        else:  # the last: through the table itself, carrying the accumulator into the sense network's backward
            rows = _CarryStashedGradient.apply(table, accumulator).index_select(0, index.flatten())
        positions = torch.arange(index.numel(), device=index.device).view_as(index)
        yield {"sense_index": positions, "word_senses": rows}


def training_distinct_words(model: torch.nn.Module, train_split, batch_size: int, accumulation: int,
                            block_length: int, seed: int, share: bool = True, static_shapes: bool = False,
                            autocast: Callable[[], AbstractContextManager] = nullcontext) -> DistinctWordSenses:
    """The trainer's distinct-word senses for a Backpack (`model` unwrapped): one table per optimizer step of
    `accumulation` micro-batches of `batch_size` packed blocks when `share` (no FSDP), else one per micro-batch.
    With `static_shapes` (a compiled forward) per-micro-batch word lists are padded to sizes calibrated on sampled
    steps of `train_split`; a shared table's rows reach the forward in one shape anyway, so its list is exact."""
    shared = share and accumulation > 1
    blocks = batch_size * (accumulation if shared else 1)
    eos = model.config.eos_token_id if model.config.eos_token_id is not None else 0
    buckets = (dataset_buckets(train_split, blocks, model.config.vocab_size, eos, seed, block_length)
               if static_shapes and not shared else None)
    return DistinctWordSenses(buckets, model.config.vocab_size, model.backpack.word_senses if shared else None,
                              autocast)
