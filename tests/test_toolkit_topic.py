"""Topic control (PAPER.md, topic control) on a tiny Backpack trained for a few AdamW steps.

* strength 0 is plain generation (same tokens, same logits);
* the bag's probability mass rises monotonically with the strength;
* the δ groups are the quantiles of s = b·(E C(x)ℓ) / max(E C(x)ℓ), and the annealing rule is the paper's;
* under the cache, each generation step's logits equal a full forward with that step's δ.
"""


import pytest
import torch

from backpack.topic import (
    STRENGTH_DELTAS,
    TOPIC_BAGS,
    TopicController,
    bag_mass,
    bag_token_ids,
    delta_groups,
    generate,
    topic_scores,
    topic_thresholds,
)
from configuration_backpack_gpt2 import BackpackGPT2Config
from modeling_backpack_gpt2 import BackpackGPT2LMHeadModel

VOCAB = 128
BAG = [3, 4, 5]


def corpus(generator: torch.Generator, count: int, length: int = 32) -> torch.Tensor:
    """Half 'topic' sequences (a bag word after every filler word that is < 40), half plain filler."""
    rows = []
    for row in range(count):
        filler = torch.randint(10, VOCAB, (length,), generator=generator)
        if row % 2 == 0:
            bag = torch.tensor(BAG)[torch.randint(0, len(BAG), (length,), generator=generator)]
            filler = torch.where(torch.arange(length) % 3 == 2, bag, filler)
        rows.append(filler)
    return torch.stack(rows)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    config = BackpackGPT2Config(n_embd=32, n_layer=2, n_head=2, num_senses=4, n_positions=64, vocab_size=VOCAB,
                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = BackpackGPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(40):
        batch = corpus(generator, 16)
        loss = model(batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_strength_zero_is_plain_generation(trained):
    prompt = torch.tensor([[20, 31, 3, 44, 57]])
    kwargs = {"attention_mask": torch.ones_like(prompt), "max_new_tokens": 15, "do_sample": False,
              "output_logits": True, "return_dict_in_generate": True, "pad_token_id": 0}
    with torch.no_grad():
        plain = trained.generate(prompt, **kwargs)
        controlled = trained.generate(prompt, sense_weights=TopicController(trained, BAG, 0), **kwargs)
    assert torch.equal(plain.sequences, controlled.sequences)
    assert torch.equal(torch.stack(plain.logits), torch.stack(controlled.logits))


def test_bag_mass_rises_monotonically_with_strength(trained):
    held_out = corpus(torch.Generator().manual_seed(99), 8)
    thresholds = topic_thresholds(trained, BAG, sample_size=None, progress=False)
    masses = [bag_mass(trained, held_out, BAG, TopicController(trained, BAG, s, anneal=False, thresholds=thresholds))
              for s in range(4)]
    print(f"\nbag probability mass at strengths 0..3: {[round(m, 4) for m in masses]}")
    assert masses == sorted(masses) and masses[3] > masses[0]
    # ...and in generation, with the cache and annealing on: bag tokens become more frequent.
    prompt = torch.tensor([[20, 31, 44, 57, 12, 90]])
    counts = []
    for strength in range(4):
        controller = TopicController(trained, BAG, strength, thresholds=thresholds)
        torch.manual_seed(0)
        with torch.no_grad():
            out = trained.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=True,
                                   top_k=0, sense_weights=controller, pad_token_id=0)
        counts.append(int(torch.isin(out[0, prompt.shape[1]:], torch.tensor(BAG)).sum()))
    print(f"bag tokens in 40 sampled tokens at strengths 0..3: {counts}")
    assert counts[3] > counts[0]


def test_groups_are_the_quantiles_of_the_direct_score(trained):
    with torch.no_grad():
        sense_logits = trained.sense_logits(torch.arange(VOCAB))  # (V, k, V)
    bag = torch.zeros(VOCAB)
    bag[BAG] = 1.0
    direct = (sense_logits @ bag) / sense_logits.amax(dim=-1)  # s = b·(E C) / max(E C)
    assert torch.allclose(topic_scores(trained, BAG, torch.arange(VOCAB)), direct, atol=1e-5)
    thresholds = topic_thresholds(trained, BAG, sample_size=None, progress=False)
    expected = torch.quantile(direct.flatten().double(), torch.tensor([0.95, 0.80, 0.60], dtype=torch.float64))
    assert torch.allclose(thresholds.double(), expected, atol=1e-6)
    groups = delta_groups(direct, thresholds)
    for group, (low, high) in enumerate([(thresholds[0], None), (thresholds[1], thresholds[0]),
                                         (thresholds[2], thresholds[1]), (None, thresholds[2])]):
        chosen = direct[groups == group]
        assert chosen.numel() > 0
        assert low is None or bool((chosen >= low).all())
        assert high is None or bool((chosen < high).all())
    controller = TopicController(trained, BAG, 2, anneal=False, thresholds=thresholds)
    expected_delta = torch.tensor(STRENGTH_DELTAS[2])[groups]  # (V, k)
    assert torch.equal(controller.word_deltas(torch.arange(VOCAB)), expected_delta)


def test_annealing_rule(trained):
    thresholds = topic_thresholds(trained, BAG, sample_size=None, progress=False)
    controller = TopicController(trained, BAG, 3, anneal=True, thresholds=thresholds)
    prompt, generated = torch.tensor([[20, 3, 44]]), [57, 4, 90]
    controller(prompt, 0)
    for step, token in enumerate(generated):
        delta = controller(torch.tensor([[token]]), prompt.shape[1] + step)
    ids = torch.cat([prompt[0], torch.tensor(generated)])
    base = controller.word_deltas(ids).T  # (k, T)
    with torch.no_grad():
        sense_logits = trained.sense_logits(ids)  # (T, k, V)
    a = sense_logits[:, :, generated].clamp(min=0).sum(dim=-1).T  # (k, T): Σ_generated max(E_xg·C(x_j)ℓ, 0)
    f = 7.5 / 3.3
    b = torch.sigmoid(-a * f + 6) * (1 + torch.arange(ids.numel()) / 100)
    assert torch.allclose(delta[0], b * base + (1 - b) * 1.0, atol=1e-5)


def test_cached_steps_equal_full_forward_with_that_steps_delta(trained):
    thresholds = topic_thresholds(trained, BAG, sample_size=None, progress=False)
    controller = TopicController(trained, BAG, 2, thresholds=thresholds)
    seen = []

    def recording(input_ids, past_length):
        delta = controller(input_ids, past_length)
        seen.append(delta.clone())
        return delta

    prompt = torch.tensor([[20, 31, 3, 44]])
    with torch.no_grad():
        out = trained.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                               sense_weights=recording, output_logits=True, return_dict_in_generate=True,
                               pad_token_id=0)
        worst = 0.0
        for step, logits in enumerate(out.logits):
            length = prompt.shape[1] + step
            full = trained(out.sequences[:, :length], sense_weights=seen[step], use_cache=False).logits[:, -1]
            worst = max(worst, float((full - logits).abs().max()))
    print(f"\ntopic control, cached step vs full forward: max |error| = {worst:.2e}")
    assert worst <= 1e-5


def test_topic_bags_and_bad_inputs(trained):
    from backpack.tokenizer import gpt2_tokenizer

    assert len(TOPIC_BAGS) == 17
    tokenizer = gpt2_tokenizer()
    ids = bag_token_ids(TOPIC_BAGS["arts_culture"], tokenizer, 50264)
    assert tokenizer.encode(" arts")[0] in ids and tokenizer.encode(" culture")[0] in ids
    with pytest.raises(ValueError, match="strength"):
        TopicController(trained, BAG, 4)
    with pytest.raises(ValueError, match="strength"):
        TopicController(trained, BAG, float("nan"))
    with pytest.raises(ValueError, match="empty"):
        TopicController(trained, [], 1)
    with pytest.raises(ValueError, match="empty"):
        bag_token_ids(["", "x"], tokenizer)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bag_token_ids([VOCAB + 1], None, VOCAB)
    with pytest.raises(ValueError, match="thresholds: 1 of 3 values are NaN"):
        TopicController(trained, BAG, 1, thresholds=torch.tensor([0.5, float("nan"), 0.1]))
    with pytest.raises(ValueError, match="empty input of shape \\(1, 0\\)"):
        bag_mass(trained, torch.zeros(1, 0, dtype=torch.long), BAG)
    nan_weights = torch.ones(1, 4, 3, 3)
    nan_weights[0, 2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="sense_weights: 1 of 36 values are NaN or infinite"):
        bag_mass(trained, torch.tensor([[1, 2, 3]]), BAG, sense_weights=nan_weights)
    for kwargs, message in (({"prompt": ""}, "empty prompt"), ({"prompt": " \n"}, "empty prompt"),
                            ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": 2.5}, "max_new_tokens"),
                            ({"top_p": float("nan")}, "top_p must be finite"), ({"top_p": 0.0}, "top_p must be in"),
                            ({"temperature": float("inf")}, "temperature must be finite"),
                            ({"temperature": 0.0}, "temperature must be > 0")):
        with pytest.raises(ValueError, match=message):
            generate(trained, tokenizer, **{"prompt": "Hi", **kwargs})
    controller = TopicController(trained, BAG, 1, thresholds=torch.tensor([0.5, 0.2, 0.1]))
    controller(torch.tensor([[1, 2]]), 0)
    with pytest.raises(RuntimeError, match="one controller per generate"):
        controller(torch.tensor([[1]]), 5)
