"""Padding-free batches: several sequences in one row, told apart by `position_ids` that restart at 0.

This is how `DataCollatorWithFlattening`, TRL's packing and flash-attention's variable-length path train without
padding. Each packed sequence must see only itself, in GPT-2's attention and in the contextualization weights of
the sense sum alike, so that a packed row gives what its sequences give alone; the length limit applies to each
sequence, not to the row. An unpadded batch that comes with an all-ones mask takes the fused causal kernels.
"""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from transformers import DataCollatorWithFlattening

from modeling_backpack_gpt2 import BlockwiseCausalSenseSum

TOLERANCE = 1e-5


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    error = ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()
    assert error <= TOLERANCE, f"relative error {error:.2e} > {TOLERANCE:.0e}"


def sequences(seed: int, lengths: tuple[int, ...]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 128, (n,), generator=generator) for n in lengths]


def packed(rows: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of concatenated sequences (all rows the same total length) and their restarting position_ids."""
    ids = torch.stack([torch.cat(row) for row in rows])
    positions = torch.stack([torch.cat([torch.arange(len(s)) for s in row]) for row in rows])
    return ids, positions


def boundaries(row: list[torch.Tensor]) -> torch.Tensor:
    """(seq, seq) True where query and key belong to different sequences of the row."""
    owner = torch.cat([torch.full((len(s),), i) for i, s in enumerate(row)])
    return owner[:, None] != owner[None, :]


# n_positions=16: every row below is longer than that, every sequence at most that long.
LAYOUT = [[10, 7, 16, 3], [16, 4, 5, 11]]


@pytest.mark.parametrize("use_cache", [False, True], ids=["no-cache", "default-cache"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_rows_equal_each_sequence_alone(attn_implementation, use_cache):
    model = tiny_model(3, attn_implementation=attn_implementation, n_positions=16)
    rows = [sequences(10 + r, lengths) for r, lengths in enumerate(LAYOUT)]
    ids, positions = packed(rows)
    with torch.no_grad():
        out = model(ids, position_ids=positions, use_cache=use_cache, output_contextualization=True,
                    output_attentions=attn_implementation == "eager")
        for r, row in enumerate(rows):
            start = 0
            for sequence in row:
                alone = model(sequence[None], use_cache=False).logits[0]
                assert_close(out.logits[r, start : start + len(sequence)], alone)
                start += len(sequence)
    # Both attentions stop at the same boundaries: no weight crosses from one sequence to another.
    for r, row in enumerate(rows):
        crossing = boundaries(row)
        assert torch.all(out.contextualization[r][:, crossing] == 0)
        if attn_implementation == "eager":
            assert all(torch.all(layer[r][:, crossing] == 0) for layer in out.attentions)


def test_padding_free_row_equals_the_padded_batch():
    """transformers' padding-free check (GPT-2 passes it): the flattened row's logits are the padded batch's."""
    model = tiny_model(4, n_positions=24)
    rows = sequences(4, (12, 5, 20, 9))
    ids = torch.stack([F.pad(r, (0, 20 - len(r))) for r in rows])
    mask = torch.stack([F.pad(torch.ones_like(r), (0, 20 - len(r))) for r in rows])
    flat, positions = packed([rows])
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, use_cache=False).logits[mask.bool()]
        padding_free = model(flat, position_ids=positions, use_cache=False).logits[0]
    assert_close(padding_free, padded)


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position-ids", "with-cu-seq-lens"])
def test_data_collator_with_flattening_trains_like_the_sequences_alone(flash_kwargs):
    rows = sequences(5, (9, 14, 6))
    features = [{"input_ids": r.tolist()} for r in rows]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(features)
    assert batch["input_ids"].shape == (1, 29)

    def gradients(loss_of) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = tiny_model(5, n_positions=16).train()
        loss = loss_of(model)
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters()}

    packed_loss, packed_grads = gradients(lambda model: model(**batch).loss)

    def separate(model):  # the same mean over every predicted token, one sequence at a time
        sums = [model(r[None], labels=r[None]).loss * (len(r) - 1) for r in rows]
        return torch.stack(sums).sum() / sum(len(r) - 1 for r in rows)

    separate_loss, separate_grads = gradients(separate)
    torch.testing.assert_close(packed_loss, separate_loss)
    for name, grad in separate_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_packed_sequence_longer_than_n_positions_is_refused():
    model = tiny_model(n_positions=16)
    ids, positions = packed([sequences(6, (10, 17))])
    with pytest.raises(ValueError, match=r"sequence of length 17 \(position_ids up to 16\) exceeds n_positions=16"):
        model(ids, position_ids=positions)
    with pytest.raises(ValueError, match="sequence length 27 .*n_positions=16"):
        model(ids)  # without position_ids the row is one sequence


# --- the fused causal path ------------------------------------------------------------------------------------


def sdpa_calls(model, **inputs) -> list[tuple[bool, bool]]:
    """(mask given, is_causal) of every attention kernel call: GPT-2's layers, then the sense sum, whose unmasked
    causal path on a CPU is the blockwise sum (no mask, causal)."""
    calls = []
    original, blockwise = F.scaled_dot_product_attention, BlockwiseCausalSenseSum.apply

    def recording(*args, attn_mask=None, is_causal=False, **kwargs):
        calls.append((attn_mask is not None, is_causal))
        return original(*args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    def recording_blockwise(*args):
        calls.append((False, True))
        return blockwise(*args)

    with mock.patch("torch.nn.functional.scaled_dot_product_attention", recording), \
            mock.patch.object(BlockwiseCausalSenseSum, "apply", recording_blockwise), torch.no_grad():
        model(**inputs)
    return calls


def test_an_all_ones_mask_takes_the_fused_causal_path():
    """Tokenizers, collators, the Trainer and TRL send an all-ones mask with unpadded batches."""
    model = tiny_model(7)
    ids = sequences(7, (12, 12))
    ids = torch.stack(ids)
    unpadded = sdpa_calls(model, input_ids=ids, attention_mask=torch.ones_like(ids))
    assert unpadded == [(False, True)] * (model.config.n_layer + 1)
    assert sdpa_calls(model, input_ids=ids) == unpadded
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    assert all(given for given, _ in sdpa_calls(model, input_ids=ids, attention_mask=mask))  # padding keeps it
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=torch.ones_like(ids)).logits, model(ids).logits)
