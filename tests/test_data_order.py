"""The run's data order (train/data_order.py): every split of a global batch over processes, batch size and
accumulation reads the same sequences in every step, from any starting position, across epochs, for datasets
with a length and for streamed ones."""

import datasets
import pytest

from backpack_train.data_order import StepLayout, training_batches

SEQUENCES = 13  # a split shorter than three steps of 8: steps straddle epochs
BLOCK = 5
SEED = 3


def split(streamed: bool):
    # Sequence i is [i, i, i, i, i]: a batch's first column says which sequences it holds.
    blocks = datasets.Dataset.from_dict({"input_ids": [[i] * BLOCK for i in range(SEQUENCES)]})
    return blocks.to_iterable_dataset() if streamed else blocks


def steps_read(streamed: bool, processes: int, batch_size: int, accumulation: int, start: int,
               steps: int) -> list[list[int]]:
    """The sequences each of ``steps`` steps reads, all processes together, in process-then-micro-batch order."""
    readers = [training_batches(split(streamed), StepLayout(processes, rank, batch_size, accumulation), start, SEED)
               for rank in range(processes)]
    found = []
    for _ in range(steps):
        step = {}
        for rank, reader in enumerate(readers):
            for micro_batch in range(accumulation):
                step[micro_batch * processes + rank] = next(reader)["input_ids"][:, 0].tolist()
        found.append([sequence for slot in sorted(step) for sequence in step[slot]])
    return found


@pytest.mark.parametrize("streamed", [False, True], ids=["indexed", "streamed"])
def test_every_split_of_a_global_batch_reads_the_same_sequences(streamed):
    reference = steps_read(streamed, 1, 8, 1, start=0, steps=5)
    for processes, batch_size, accumulation in ((1, 4, 2), (2, 4, 1), (2, 2, 2), (1, 2, 4), (4, 1, 2)):
        assert steps_read(streamed, processes, batch_size, accumulation, 0, 5) == reference, (processes, batch_size)
    stream = [sequence for step in reference for sequence in step]
    assert sorted(stream[:SEQUENCES]) == list(range(SEQUENCES))  # an epoch reads every sequence once
    assert sorted(stream[SEQUENCES : 2 * SEQUENCES]) == list(range(SEQUENCES))
    assert stream[:SEQUENCES] != stream[SEQUENCES : 2 * SEQUENCES]  # and the next epoch in another order

    # Resuming at a position (two steps in, a new split, then a larger global batch) continues the same stream.
    assert steps_read(streamed, 2, 2, 2, start=16, steps=3) == reference[2:]
    assert steps_read(streamed, 1, 4, 4, start=16, steps=1)[0] == stream[16:32]


def test_the_indexed_order_is_a_seeded_permutation_per_epoch():
    import torch

    order = [sequence for step in steps_read(False, 1, 13, 1, start=0, steps=2) for sequence in step]
    for epoch in (0, 1):
        permutation = torch.randperm(SEQUENCES, generator=torch.Generator().manual_seed(SEED + epoch)).tolist()
        assert order[epoch * SEQUENCES : (epoch + 1) * SEQUENCES] == permutation
