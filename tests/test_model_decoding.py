"""Fast decoding and compiled training, the parts a GPU is not needed to show.

A decoding step must ask the device nothing back (a `.item()` is a full GPU pipeline stall on every token), the
static cache must generate exactly what the default cache does, and `torch.compile(fullgraph=True)` must capture
decoding and training without graph breaks (`backend="eager"` / `"aot_eager"` keeps the capture cheap on CPU).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer, StaticLayer

# ATen ops that read a device value back to the host or whose output shape depends on the data.
SYNCING_OPS = {
    "_local_scalar_dense",  # .item(), int(), float(), bool() of a tensor
    "is_nonzero",
    "equal",
    "nonzero",
    "masked_select",
    "unique",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
}


class SyncCounter(TorchDispatchMode):
    """Records every syncing ATen op run while active."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in SYNCING_OPS:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def prompt(padded: bool | str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A (3, 7) prompt, its first two rows left-padded when `padded` (pad id 0); `"ones"`: an all-ones mask, as
    tokenizers give unpadded batches."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (3, 7), generator=generator)
    if padded == "ones":
        return ids, torch.ones_like(ids)
    if not padded:
        return ids, None
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_sync_counter_sees_a_sync():
    with SyncCounter() as counter:
        int(torch.ones(3).sum())
        torch.unique(torch.tensor([1, 1, 2]))
    assert counter.ops == ["_local_scalar_dense", "_unique2"]


@pytest.mark.parametrize("padded", [False, True, "ones"], ids=["no-mask", "padded", "all-ones-mask"])
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_a_decoding_step_asks_the_device_nothing(cache_kind, padded):
    model = tiny_model(1)
    ids, mask = prompt(padded)
    cache = StaticCache(config=model.config, max_cache_len=16) if cache_kind == "static" else DynamicCache()
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache, use_cache=True)
        step_mask = None if mask is None else F.pad(mask, (0, 1), value=1)
        positions = torch.full((3, 1), 7) if mask is None else step_mask.sum(-1, keepdim=True) - 1
        with SyncCounter() as counter:
            out = model(ids[:, :1], attention_mask=step_mask, position_ids=positions, cache=cache, use_cache=True)
    assert counter.ops == []
    # The caller's plain transformers cache keeps its class and holds the senses, so its reference works on.
    assert type(cache) is (StaticCache if cache_kind == "static" else DynamicCache)
    assert out.cache is cache and len(cache.layers) == model.config.n_layer
    assert isinstance(cache.sense_layer, StaticLayer if cache_kind == "static" else DynamicLayer)


@pytest.mark.parametrize("padded", [False, True])
def test_static_cache_generates_what_the_default_cache_generates(padded):
    model = tiny_model(1)
    ids, mask = prompt(padded, seed=1)
    settings = dict(attention_mask=mask, max_new_tokens=10, pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(ids, do_sample=False, **settings),
                       model.generate(ids, do_sample=False, cache_implementation="static", **settings))
    torch.manual_seed(7)
    sampled = model.generate(ids, do_sample=True, top_k=20, **settings)
    torch.manual_seed(7)
    sampled_static = model.generate(ids, do_sample=True, top_k=20, cache_implementation="static", **settings)
    assert torch.equal(sampled, sampled_static)


def test_static_cache_beyond_the_positions_is_refused_before_generating():
    model = tiny_model(n_positions=16)
    with pytest.raises(ValueError, match="would reach 27 tokens, past n_positions=16"):
        model.generate(torch.ones(1, 7, dtype=torch.long), max_new_tokens=20, cache_implementation="static",
                       pad_token_id=0, eos_token_id=None)


def test_compiled_static_decoding_is_one_graph_per_shape_and_generates_the_same():
    """transformers' recipe for fast decoding: static cache + `torch.compile(model.forward, fullgraph=True)`."""
    model = tiny_model(2)
    graphs: list[int] = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(len(graph_module.graph.nodes))
        return graph_module.forward

    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None,
                    cache_implementation="static")
    padded_ids, mask = prompt(True, seed=2)
    expected_padded = model.generate(padded_ids, attention_mask=mask, **settings)
    expected = model.generate(padded_ids[2:], **settings)

    model.forward = torch.compile(model.forward, backend=counting_backend, fullgraph=True)  # a break would raise
    assert torch.equal(model.generate(padded_ids, attention_mask=mask, **settings), expected_padded)
    assert torch.equal(model.generate(padded_ids, attention_mask=mask, **settings), expected_padded)
    # The prefill and the decoding step (transformers 5.4 specialises once more in its second call): never one per
    # step, and after that every generate() of these sizes reuses them.
    compiled_graphs = len(graphs)
    assert 2 <= compiled_graphs <= 3
    assert torch.equal(model.generate(padded_ids, attention_mask=mask, **settings), expected_padded)
    assert len(graphs) == compiled_graphs
    assert torch.equal(model.generate(padded_ids[2:], **settings), expected)


def test_compiled_training_step_is_one_graph_and_equals_eager():
    """Forward and backward captured whole (AOTAutograd traces the backward too); a second step compiles nothing."""
    model = tiny_model(3, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).train()
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))
    graphs: list[int] = []

    def counting_aot_backend(graph_module, example_inputs):
        graphs.append(len(graph_module.graph.nodes))
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def run_as_traced(traced, _inputs):
            return make_boxed_func(traced.forward)

        return aot_autograd(fw_compiler=run_as_traced, bw_compiler=run_as_traced)(graph_module, example_inputs)

    def step(module, call) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        module.zero_grad(set_to_none=True)
        loss = call(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in module.named_parameters()}

    eager_loss, eager_grads = step(model, model)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend=counting_aot_backend, fullgraph=True)
    loss, grads = step(compiled_model, compiled)
    assert len(graphs) == 1
    torch.testing.assert_close(loss, eager_loss)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    step(compiled_model, compiled)
    compiled_model.eval()
    with torch.no_grad():  # evaluation: the same forward without gradients
        torch.testing.assert_close(compiled(input_ids=ids, use_cache=False).logits,
                                   model.eval()(input_ids=ids, use_cache=False).logits)
    assert len(graphs) == 2  # training once, evaluation once; the second training step reused the first
