"""The sense network once per distinct word (train/distinct_words.py): the host-side word lists, and a training
step that gives the per-token path's losses and gradients, eagerly, compiled (no recompilation per step) and under
DDP (2 gloo processes)."""

import contextlib
import gc
import os
import socket
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from backpack_train.distinct_words import (
    DistinctWordSenses,
    calibrated_buckets,
    plan_distinct_words,
    word_buckets,
)
from backpack_train.loss import step_gradients
from configuration_backpack_gpt2 import BackpackGPT2Config
from modeling_backpack_gpt2 import BackpackGPT2LMHeadModel

VOCAB = 96


def tiny_model(dropout: float = 0.0, seed: int = 0) -> BackpackGPT2LMHeadModel:
    torch.manual_seed(seed)
    config = BackpackGPT2Config(n_embd=32, n_layer=2, n_head=2, num_senses=4, n_positions=16, vocab_size=VOCAB,
                                resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0,
                                eos_token_id=0)
    return BackpackGPT2LMHeadModel(config).train()


def micro_batches(count: int, batch: int = 2, seq: int = 16, seed: int = 1) -> list[dict]:
    """CPU micro-batches of repetitive text (a small vocabulary range), as the collator gives them."""
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 40, (count, batch, seq + 1), generator=generator)
    return [{"input_ids": block[:, :-1].clone(), "targets": block[:, 1:].clone()} for block in blocks]


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def assert_same_gradients(expected: dict, actual: dict, tolerance: float = 1e-5) -> None:
    assert expected.keys() == actual.keys()
    for name, grad in expected.items():
        error = ((actual[name] - grad).norm() / grad.norm().clamp(min=1e-12)).item()
        assert error < tolerance, (name, error)


def test_word_lists_reconstruct_every_token_and_pad_to_a_bucket():
    ids = [np.array([[5, 7, 5, 9]]), np.array([[9, 9, 1, 7]])]
    plan = plan_distinct_words(ids, (8, 16), VOCAB)
    assert plan.distinct == 4 and plan.words.shape == (8,)
    assert plan.words[:4].tolist() == [1, 5, 7, 9]  # sorted distinct words, then padding
    for host, index in zip(ids, plan.indices):
        assert torch.equal(plan.words[index], torch.from_numpy(host))
    with pytest.raises(ValueError, match=r"token id 96, outside the vocabulary \[0, 96\)"):
        plan_distinct_words([np.array([[1, 96]])], (8,), VOCAB)
    with pytest.raises(ValueError, match="exceed the largest bucket"):
        plan_distinct_words([np.arange(20)[None]], (8, 16), VOCAB)
    exact = plan_distinct_words(ids, None, VOCAB)  # eager steps: no bucket, no padding
    assert exact.words.tolist() == [1, 5, 7, 9]
    for host, index in zip(ids, exact.indices):
        assert torch.equal(exact.words[index], torch.from_numpy(host))


def test_buckets_double_from_the_calibrated_size_up_to_what_any_step_needs():
    assert word_buckets(131_072, 50_264, 15_000) == (15_040, 30_080, 50_264)
    assert word_buckets(1_000, 50_264) == (64, 128, 256, 512, 1_000)
    # 5 % above the largest sampled step, rounded up to a multiple of 64, then 25 % steps up to the cap.
    assert calibrated_buckets([900, 1_000, 950], 4_096, 50_264) == (1_088, 1_408, 1_792, 2_240, 2_816, 3_520, 4_096)


def test_word_lists_are_read_from_cpu_batches_and_sent_to_the_device():
    batch = micro_batches(1)[0]
    arguments = list(DistinctWordSenses((64,), VOCAB).forward_arguments([batch], "meta"))
    assert arguments[0]["sense_index"].device.type == "meta" and arguments[0]["sense_words"].device.type == "meta"
    moved = {key: value.to("meta") for key, value in batch.items()}
    with pytest.raises(ValueError, match="read the token ids on the host: pass the CPU micro-batches"):
        DistinctWordSenses((64,), VOCAB).forward_arguments([moved])


@pytest.mark.parametrize("shared", [False, True], ids=["per_micro_batch", "per_step"])
def test_without_dropout_a_step_has_the_per_token_losses_and_gradients(shared):
    model = tiny_model()
    batches = micro_batches(3)
    expected_loss = step_gradients(model, batches)
    expected = gradients(model)
    senses = DistinctWordSenses((32, 64), VOCAB, model.backpack.word_senses if shared else None)
    loss = step_gradients(model, batches, distinct_words=senses)
    assert senses.last_plan.words.shape == ((64,) if shared else (32,))
    # What the sense network ran on (the trainer logs it per step): one padded list, or one per micro-batch.
    assert senses.words_computed == (64 if shared else 3 * 32)
    assert torch.allclose(loss, expected_loss, rtol=1e-6)
    assert_same_gradients(expected, gradients(model))


def test_dropout_draws_one_mask_per_word():
    model = tiny_model(dropout=0.5)
    ids = torch.tensor([[3, 4, 3, 5, 3, 4]])
    plan = plan_distinct_words([ids.numpy()], (8,), VOCAB)
    shared = model(ids, sense_index=plan.indices[0], sense_words=plan.words, output_senses=True).senses
    per_token = model(ids, output_senses=True).senses
    assert torch.equal(shared[:, :, 0], shared[:, :, 2]) and torch.equal(shared[:, :, 0], shared[:, :, 4])
    assert not torch.equal(per_token[:, :, 0], per_token[:, :, 2])


def test_compiled_steps_compile_once_per_bucket_and_match_eager():
    from torch._dynamo.utils import counters

    model = tiny_model()
    senses = DistinctWordSenses((64,), VOCAB, model.backpack.word_senses)
    steps = [micro_batches(2, seed=seed) for seed in (1, 2, 3)]
    eager = []
    for batches in steps:
        eager.append((step_gradients(model, batches, distinct_words=senses), gradients(model)))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    graphs = []
    for batches, (loss, grads) in zip(steps, eager):
        compiled_loss = step_gradients(compiled, batches, distinct_words=senses)
        assert torch.allclose(compiled_loss, loss, rtol=1e-5)
        assert_same_gradients(grads, gradients(model), 1e-4)
        graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert graphs[0] >= 1 and graphs[1] == graphs[2] == graphs[0]  # the first step compiles, later ones reuse it


def _ddp_worker(rank: int, port: int, folder: str) -> None:
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    wrapped = None
    try:
        torch.set_num_threads(1)
        model = tiny_model()
        wrapped = DistributedDataParallel(model)
        batches = micro_batches(2, seed=10 + rank)  # each process its own two micro-batches
        for shared in (False, True):
            senses = DistinctWordSenses((64,), VOCAB, model.backpack.word_senses if shared else None)
            contexts = iter([wrapped.no_sync, contextlib.nullcontext])  # synchronise on the last micro-batch
            step_gradients(wrapped, batches, backward=lambda loss: (loss / 2).backward(),
                           micro_step=lambda contexts=contexts: next(contexts)(), distinct_words=senses)
            grads = gradients(model)
            if rank == 0:
                save_file(grads, os.path.join(folder, f"shared_{shared}.safetensors"))
    finally:
        # The wrapper's reducer goes first: freed after the process group was destroyed, it would be the last owner
        # of the group and join gloo's threads while holding the GIL one of them may need (a hang at exit).
        del wrapped
        gc.collect()
        dist.destroy_process_group()


def test_ddp_step_synchronises_the_per_token_gradients(tmp_path):
    """2 gloo processes, 2 micro-batches each (the first under no_sync): the sense network's gradient arrives in
    the synchronised backward, and equals the per-token path's average over both processes."""
    from safetensors.torch import load_file

    model = tiny_model()
    all_batches = micro_batches(2, seed=10) + micro_batches(2, seed=11)
    step_gradients(model, all_batches, backward=lambda loss: (loss / 4).backward())
    expected = gradients(model)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.start_processes(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-process DDP step did not finish in 300 s")
    for shared in (False, True):
        grads = load_file(str(tmp_path / f"shared_{shared}.safetensors"))
        assert_same_gradients(expected, {name: grads[name] for name in expected})


def test_distinct_word_arguments_are_checked():
    model = tiny_model().eval()
    ids = torch.tensor([[3, 4, 3]])
    index, words = torch.tensor([[0, 1, 0]]), torch.tensor([3, 4])
    with pytest.raises(ValueError, match="need sense_index"):
        model(ids, sense_words=words)
    with pytest.raises(ValueError, match="sense_index has shape"):
        model(ids, sense_index=index[:, :2], sense_words=words)
    with pytest.raises(ValueError, match="exactly one of sense_words"):
        model(ids, sense_index=index)
    with pytest.raises(ValueError, match=r"word_senses must have shape \(words, 4, 32\)"):
        model(ids, sense_index=index, word_senses=torch.zeros(2, 4, 16))
    with pytest.raises(ValueError, match="sense_index needs input_ids"):
        model(inputs_embeds=torch.zeros(1, 3, 32), sense_index=index, sense_words=words)
    table = model.backpack.word_senses(words)
    assert torch.allclose(model(ids, sense_index=index, word_senses=table).logits, model(ids).logits, atol=1e-6)
