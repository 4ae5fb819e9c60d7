"""The run's data order in global units, so that any split of a step over processes reads the same sequences.

The training split is read as one endless stream of sequences: epoch ``e`` is the split shuffled by
``randperm(N, seed + e)``, and stream position ``g`` is sequence ``permutation_{g // N}[g mod N]``. Optimizer step
``t`` of a run reads the next ``S = processes x batch_size x accumulation`` positions of the stream after those its
earlier steps read; a checkpoint stores how many positions were read (``sequences``), nothing per process. Inside
a step, micro-batch ``m`` of process ``r`` reads positions ``start + (m * processes + r) * batch_size`` onwards
(``batch_size`` of them), so

* 2 processes x 4 sequences, 1 process x 4 sequences x 2 accumulation and 1 process x 2 sequences x 4
  accumulation read the same 8 sequences in every step, and a run resumed with another of these splits reads
  exactly what the uninterrupted run would have;
* a run resumed with another global batch ``S`` continues at the same stream position with the new batch.

Streamed datasets (no length) are read in their shuffled order (``IterableDataset.shuffle(seed)``, epoch ``e``
reshuffled by ``set_epoch(e)``); every process reads the whole stream and keeps its own positions, so the order
does not depend on the number of processes either, and a resume skips the positions already read by reading them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import datasets
import torch
from torch.utils.data import DataLoader, Sampler

from backpack_train.data import collate_blocks

STREAM_SHUFFLE_BUFFER = 10_000  # sequences held by a streamed dataset's shuffle buffer


@dataclass(frozen=True)
class StepLayout:
    """How one optimizer step's sequences are split: over processes, then over micro-batches of each process."""

    num_processes: int
    process_index: int
    batch_size: int
    accumulation: int

    @property
    def sequences_per_step(self) -> int:
        """``S``: the global batch, in sequences."""
        return self.num_processes * self.batch_size * self.accumulation

    def micro_batch_start(self, step_start: int, micro_batch: int) -> int:
        """Stream position of the first sequence of this process's ``micro_batch`` in the step at ``step_start``."""
        return step_start + (micro_batch * self.num_processes + self.process_index) * self.batch_size

    def owner(self, offset: int) -> tuple[int, int]:
        """``(process, micro_batch)`` that reads the sequence ``offset`` positions into a step."""
        micro_batch, process = divmod(offset // self.batch_size, self.num_processes)
        return process, micro_batch


class ShuffledOrder:
    """Stream position -> index into a split of ``num_sequences`` sequences (one seeded permutation per epoch)."""

    def __init__(self, num_sequences: int, seed: int):
        if num_sequences < 1:
            raise ValueError("the training split holds no sequence")
        self.num_sequences = num_sequences
        self.seed = seed
        self._permutations: dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:  # a step spans at most two epochs (or one split is shorter than it)
                self._permutations.pop(min(self._permutations))
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._permutations[epoch] = torch.randperm(self.num_sequences, generator=generator)
        return self._permutations[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        """The split indices at stream positions ``start ... start + count - 1``."""
        found: list[int] = []
        while count > 0:
            epoch, offset = divmod(start, self.num_sequences)
            take = min(count, self.num_sequences - offset)
            found += self.permutation(epoch)[offset : offset + take].tolist()
            start, count = start + take, count - take
        return found


class StepBatchSampler(Sampler[list[int]]):
    """This process's micro-batches (lists of split indices), step after step, from stream position ``start``."""

    def __init__(self, order: ShuffledOrder, layout: StepLayout, start: int):
        self.order, self.layout, self.start = order, layout, start

    def __iter__(self) -> Iterator[list[int]]:
        step_start = self.start
        while True:
            for micro_batch in range(self.layout.accumulation):
                first = self.layout.micro_batch_start(step_start, micro_batch)
                yield self.order.indices(first, self.layout.batch_size)
            step_start += self.layout.sequences_per_step


def _streamed_micro_batches(stream: datasets.IterableDataset, layout: StepLayout, start: int,
                            seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """This process's micro-batches of a streamed split: every process reads the stream, keeping its positions."""
    stream = stream.shuffle(seed=seed, buffer_size=STREAM_SHUFFLE_BUFFER)
    per_step = layout.sequences_per_step
    pending: dict[int, list[dict]] = {}  # micro-batch -> its sequences so far, within the current step
    position, epoch = 0, 0
    while True:
        stream.set_epoch(epoch)
        read_any = False
        for example in stream:
            read_any = True
            if position >= start:
                process, micro_batch = layout.owner((position - start) % per_step)
                if process == layout.process_index:
                    pending.setdefault(micro_batch, []).append(example)
                    if len(pending[micro_batch]) == layout.batch_size:  # micro-batches fill in order
                        yield collate_blocks(pending.pop(micro_batch))
            position += 1
        if not read_any:
            raise ValueError("the streamed training split holds no sequence")
        epoch += 1


def training_batches(split, layout: StepLayout, start: int, seed: int,
                     pin_memory: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Endless CPU micro-batches of this process (``input_ids``, ``targets``), from stream position ``start``.

    ``layout.accumulation`` consecutive micro-batches make one optimizer step.
    """
    if isinstance(split, datasets.IterableDataset):
        return _streamed_micro_batches(split, layout, start, seed)
    sampler = StepBatchSampler(ShuffledOrder(len(split), seed), layout, start)
    # Its own generator: starting the loader never draws from the global RNG (the dropout masks' source).
    return iter(DataLoader(split, batch_sampler=sampler, collate_fn=collate_blocks, pin_memory=pin_memory,
                           generator=torch.Generator().manual_seed(seed)))
