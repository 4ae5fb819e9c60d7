"""Exactness of the toolkit's sense-level claims on a tiny random Backpack.

* Scaling sense ℓ of x by γ changes position i's logits by exactly Σ_{j: x_j = x} (γ−1) α[ℓ,i,j] E·C(x_j)[ℓ],
  without cache, with the cache (token by token) and inside `generate()`.
* (word, sense) contributions sum to the model's logit (and log-prob / contrast).
* The knowledge edit is the formula of PAPER.md §6.3, and removing interventions restores the exact logits.

Each test prints its measured max error (run with ``-s`` to see them).
"""


import pytest
import torch

from backpack.explain import explain_prediction
from backpack.interventions import (
    active_interventions,
    knowledge_edit,
    predicted_scale_effect,
    remove_all_interventions,
    scale_sense,
    zero_sense,
)
from configuration_backpack_gpt2 import BackpackGPT2Config
from modeling_backpack_gpt2 import BackpackGPT2LMHeadModel

VOCAB = 97
TOLERANCE = 1e-5
CONTEXTS = 24


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = BackpackGPT2Config(n_embd=32, n_layer=2, n_head=2, num_senses=4, n_positions=64, vocab_size=VOCAB,
                                bos_token_id=0, eos_token_id=0, initializer_range=0.1)
    model = BackpackGPT2LMHeadModel(config).eval()
    yield model
    remove_all_interventions(model)


def random_case(generator: torch.Generator, length: int):
    """A random context with word x planted at 1-4 random positions, and a random sense ℓ and γ."""
    ids = torch.randint(0, VOCAB, (1, length), generator=generator)
    x = int(torch.randint(0, VOCAB, (1,), generator=generator))
    for position in torch.randperm(length, generator=generator)[: int(torch.randint(1, 5, (1,), generator=generator))]:
        ids[0, position] = x
    sense = int(torch.randint(0, 4, (1,), generator=generator))
    gamma = float(torch.empty(1).uniform_(-2.0, 3.0, generator=generator))
    return ids, x, sense, gamma


def unmodified_parts(model, ids):
    with torch.no_grad():
        return model(ids, output_contextualization=True, output_senses=True, use_cache=False)


def test_scaling_is_exact_without_cache(model):
    generator = torch.Generator().manual_seed(1)
    worst = 0.0
    for _ in range(CONTEXTS):
        ids, x, sense, gamma = random_case(generator, int(torch.randint(2, 60, (1,), generator=generator)))
        base = unmodified_parts(model, ids)
        predicted = base.logits + predicted_scale_effect(base.contextualization, base.senses, model.lm_head.weight,
                                                         ids, [x], sense, gamma)
        with torch.no_grad():
            plain = model(ids, use_cache=False).logits
        with scale_sense(model, x, sense, gamma), torch.no_grad():
            edited = model(ids, use_cache=False).logits
        worst = max(worst, float((edited - predicted).abs().max()))
        with torch.no_grad():
            assert torch.equal(model(ids, use_cache=False).logits, plain), "removal must restore exactly"
    print(f"\nscaling, no cache: max |error| over {CONTEXTS} contexts = {worst:.2e}")
    assert worst <= TOLERANCE


def test_scaling_is_exact_under_the_cache(model):
    generator = torch.Generator().manual_seed(2)
    worst = 0.0
    for _ in range(CONTEXTS // 2):
        ids, x, sense, gamma = random_case(generator, int(torch.randint(4, 40, (1,), generator=generator)))
        base = unmodified_parts(model, ids)
        predicted = base.logits + predicted_scale_effect(base.contextualization, base.senses, model.lm_head.weight,
                                                         ids, [x], sense, gamma)
        prefix = int(torch.randint(1, ids.shape[1], (1,), generator=generator))
        with scale_sense(model, x, sense, gamma), torch.no_grad():
            out = model(ids[:, :prefix], use_cache=True)
            logits, cache = [out.logits], out.past_key_values
            for position in range(prefix, ids.shape[1]):  # then one token at a time from the cache
                out = model(ids[:, position:position + 1], past_key_values=cache, use_cache=True)
                logits.append(out.logits)
                cache = out.past_key_values
        worst = max(worst, float((torch.cat(logits, dim=1) - predicted).abs().max()))
    print(f"\nscaling, KV cache: max |error| = {worst:.2e}")
    assert worst <= TOLERANCE


def test_scaling_is_exact_in_generate(model):
    generator = torch.Generator().manual_seed(3)
    worst = 0.0
    for _ in range(6):
        prompt, x, sense, gamma = random_case(generator, int(torch.randint(3, 12, (1,), generator=generator)))
        with scale_sense(model, x, sense, gamma), torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        generated = torch.stack(out.logits, dim=1)  # (1, new, vocab): the edited model's logits at each step
        ids = out.sequences[:, :-1]
        base = unmodified_parts(model, ids)
        predicted = base.logits + predicted_scale_effect(base.contextualization, base.senses, model.lm_head.weight,
                                                         ids, [x], sense, gamma)
        worst = max(worst, float((generated - predicted[:, prompt.shape[1] - 1:]).abs().max()))
    print(f"\nscaling, generate(): max |error| = {worst:.2e}")
    assert worst <= TOLERANCE


def test_contributions_sum_to_the_logit(model):
    generator = torch.Generator().manual_seed(4)
    worst = 0.0
    for _ in range(CONTEXTS):
        ids = torch.randint(0, VOCAB, (int(torch.randint(1, 50, (1,), generator=generator)),), generator=generator)
        position = int(torch.randint(0, ids.numel(), (1,), generator=generator))
        target, contrast = (int(t) for t in torch.randint(0, VOCAB, (2,), generator=generator))
        explanation = explain_prediction(model, ids, target, position)
        with torch.no_grad():
            logits = model(ids[None], use_cache=False).logits[0, position]
        assert explanation.contributions.shape == (4, position + 1)
        logit = float(logits[target])
        worst = max(worst, abs(explanation.total - logit), abs(explanation.value - logit))
        log_prob = float(torch.log_softmax(logits.double(), dim=-1)[target])
        assert abs(explanation.log_prob - log_prob) <= TOLERANCE
        contrasted = explain_prediction(model, ids, target, position, contrast=contrast)
        worst = max(worst, abs(contrasted.total - float(logits[target] - logits[contrast])))
    print(f"\ncontributions vs logit: max |error| = {worst:.2e}")
    assert worst <= TOLERANCE


def test_knowledge_edit_formula_and_restore(model):
    x, removed, added = 5, 11, 17
    ids = torch.tensor([[3, x, 8, 9, x, 2]])
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
        senses = model.sense_vectors([x])[0].double()
        embedding = model.get_input_embeddings().weight.double()
    e_r, e_a = embedding[removed], embedding[added]
    phi = e_a.dot(e_a) / e_r.dot(e_r)
    beta = senses @ e_r / e_r.dot(e_r)  # (k,) component of each sense along E x_r
    expected = senses - beta[:, None] * e_r + (beta[:, None] / phi) * e_a
    edit = knowledge_edit(model, x, removed, added)
    with torch.no_grad():
        edited = model.sense_vectors([x])[0].double()
    assert torch.allclose(edited, expected, atol=1e-6)
    # x_r's component is gone: what is left besides the moved part is orthogonal to E x_r.
    assert float(((edited - (beta[:, None] / phi) * e_a) @ e_r).abs().max()) <= 1e-6
    assert torch.equal(model.sense_vectors([removed]), model.sense_vectors([removed]))  # other words untouched
    edit.remove()
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, before)


def test_interventions_stack_and_restore_in_any_order(model):
    ids = torch.tensor([[1, 4, 7, 4, 9, 4]])
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
    original_senses = model.sense_vectors([4])[0].clone()
    own_edit = original_senses * 0.5  # an edit set outside the toolkit must survive
    model.set_sense_edit(4, own_edit)
    with torch.no_grad():
        with_own = model(ids, use_cache=False).logits
    first = scale_sense(model, 4, 1, 3.0)
    second = zero_sense(model, [4, 7], 2)
    third = knowledge_edit(model, 4, 9, 7)
    composed = own_edit.clone()
    composed[1] *= 3.0
    composed[2] *= 0.0
    from backpack.interventions import knowledge_edit_senses

    embedding = model.get_input_embeddings().weight.detach()
    composed = knowledge_edit_senses(composed, embedding[9], embedding[7])
    assert torch.allclose(model.sense_vectors([4])[0], composed, atol=1e-6)
    assert len(active_interventions(model)) == 3
    second.remove()  # out of order: the others are recomputed from the base
    partial = own_edit.clone()
    partial[1] *= 3.0
    assert torch.allclose(model.sense_vectors([4])[0], knowledge_edit_senses(partial, embedding[9], embedding[7]),
                          atol=1e-6)
    first.remove()
    third.remove()
    assert torch.equal(model.backpack.sense_edits[4], own_edit)
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, with_own)
    model.remove_sense_edits([4])
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, before)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: scale_sense(m, 3, 4, 0.5), "out of range"),
        (lambda m: scale_sense(m, 3, -1, 0.5), "out of range"),
        (lambda m: scale_sense(m, 3, 1, float("nan")), "finite"),
        (lambda m: scale_sense(m, 3, 1, float("inf")), "finite"),
        (lambda m: scale_sense(m, "", 1, 0.5), "empty word"),
        (lambda m: scale_sense(m, "bank", 1, 0.5), "no tokenizer"),
        (lambda m: scale_sense(m, VOCAB + 3, 1, 0.5), "outside the vocabulary"),
        (lambda m: scale_sense(m, 3, 1, 0.5, policy="last"), "subword policy"),
        (lambda m: knowledge_edit(m, 3, -2, 4), "outside the vocabulary"),
        (lambda m: explain_prediction(m, [1, 2, 3], 4, position=3), "out of range"),
        (lambda m: explain_prediction(m, [], 4), "empty"),
        (lambda m: explain_prediction(m, [1, 2], VOCAB), "outside the vocabulary"),
        (lambda m: explain_prediction(m, torch.zeros(1, 0, dtype=torch.long), 4), "empty context"),
        (lambda m: predicted_scale_effect(torch.ones(1, 4, 2, 2), torch.ones(1, 4, 2, 32), torch.ones(VOCAB, 32),
                                          torch.tensor([[1, 2]]), [1], 0, float("nan")), "finite"),
    ],
)
def test_bad_inputs_raise_value_error(model, call, message):
    with pytest.raises(ValueError, match=message):
        call(model)
    assert not active_interventions(model)
    assert not model.backpack.sense_edits
