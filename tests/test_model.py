"""The model package: checkpoint compatibility, golden outputs, caching, padding, attention paths, generation."""

import json
import logging
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import REFERENCE, REPO, TINY_CHECKPOINT, hub_folder, tiny_config, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from backpack.tokenizer import gpt2_tokenizer
from configuration_backpack_gpt2 import BackpackGPT2Config
from modeling_backpack_gpt2 import (
    CAUSAL_SENSE_SUM_BLOCK,
    BackpackGPT2LMHeadModel,
    BlockwiseCausalSenseSum,
    contextualization_weights,
    fused_weighted_sense_sum,
    sense_attention_mask,
    weighted_sense_sum,
)

TOLERANCE = 1e-5


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e|: the golden comparison's measure."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = TOLERANCE) -> None:
    error = relative_error(actual, expected)
    assert error <= tolerance, f"relative error {error:.2e} > {tolerance:.0e}"


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> BackpackGPT2LMHeadModel:
    """The tiny checkpoint loaded exactly as the Hub serves the published model."""
    folder = hub_folder(TINY_CHECKPOINT, tmp_path_factory.mktemp("hub"))
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()


def random_batch(seed: int, batch: int, length: int, vocab: int = 128) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


# --- configuration and checkpoint layout ----------------------------------------------------------------------


def test_published_config_loads_as_published(tmp_path):
    config = AutoConfig.from_pretrained(hub_folder(REFERENCE, tmp_path), trust_remote_code=True)
    assert type(config).__name__ == "BackpackGPT2Config"
    assert (config.num_senses, config.sense_intermediate_scale, config.vocab_size) == (16, 4, 50264)
    assert (config.n_positions, config.n_embd, config.n_layer) == (512, 768, 12)
    # The published file says "gpt2"; it is read as the Backpack it is (no type-mismatch warning).
    assert json.loads((REFERENCE / "config.json").read_text())["model_type"] == "gpt2"
    assert config.model_type == "backpack-gpt2"
    assert config.scale_attn_by_inverse_layer_idx


def test_config_defaults_are_the_published_ones():
    config = BackpackGPT2Config()
    assert (config.num_senses, config.sense_intermediate_scale, config.vocab_size, config.n_positions) == (
        16, 4, 50264, 512,
    )
    assert config.scale_attn_by_inverse_layer_idx


def test_config_of_another_vocabulary_keeps_no_gpt2_token_outside_it(caplog):
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = BackpackGPT2Config(vocab_size=1000)
    assert (config.bos_token_id, config.eos_token_id) == (None, None)
    assert not caught and not [r for r in caplog.records if "token_id" in r.getMessage()]
    assert BackpackGPT2Config(vocab_size=1000, eos_token_id=999).eos_token_id == 999
    assert BackpackGPT2Config.from_pretrained(TINY_CHECKPOINT).eos_token_id == 511  # what a config names stays


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(n_embd=100, num_senses=16, n_head=4), "divisible by num_senses"),
    (dict(n_embd=96, num_senses=16, n_head=5), "divisible by n_head"),
    (dict(tie_word_embeddings=False), "tie_word_embeddings must be True"),
])
def test_config_rejects_indivisible_sizes(overrides, message):
    with pytest.raises(ValueError, match=message):
        BackpackGPT2Config(**overrides)


def test_state_dict_matches_published_manifest():
    config = BackpackGPT2Config.from_pretrained(REFERENCE)
    with torch.device("meta"):
        model = BackpackGPT2LMHeadModel(config)
    rows = (REFERENCE / "state_dict_manifest.tsv").read_text().splitlines()[1:]
    manifest = {name: tuple(int(n) for n in shape.split("x")) for name, shape, _ in (row.split("\t") for row in rows)}
    state = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    assert state == manifest
    assert sum(p.numel() for p in model.parameters()) == 170_083_584  # parameters() counts aliases once
    assert model.lm_head.weight is model.backpack.word_embeddings.weight is model.backpack.gpt2_model.wte.weight
    assert model.backpack.position_embeddings.weight is model.backpack.gpt2_model.wpe.weight


def test_published_weights_load_without_missing_or_unexpected_keys(caplog):
    with caplog.at_level(logging.WARNING):
        model, info = BackpackGPT2LMHeadModel.from_pretrained(TINY_CHECKPOINT, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    assert not [r for r in caplog.records if "key" in r.getMessage().lower()]
    state = torch.load(TINY_CHECKPOINT / "pytorch_model.bin", weights_only=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name


# --- golden outputs -------------------------------------------------------------------------------------------


def test_reproduces_published_outputs(published, expected):
    with torch.no_grad():
        out = published(expected["input_ids"], output_contextualization=True, output_senses=True, use_cache=False)
    assert_close(out.logits, expected["logits"])
    assert_close(out.contextualization, expected["contextualization"])
    assert_close(out.senses, expected["senses"])


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_fused_and_eager_sense_sums_reproduce_published_logits(expected, attn_implementation):
    model = BackpackGPT2LMHeadModel.from_pretrained(TINY_CHECKPOINT, attn_implementation=attn_implementation).eval()
    with torch.no_grad():
        logits = model(expected["input_ids"], use_cache=False).logits
    assert_close(logits, expected["logits"])


# --- save / load ----------------------------------------------------------------------------------------------


def test_save_load_round_trip_in_safetensors(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"model.safetensors", "config.json", "configuration_backpack_gpt2.py", "modeling_backpack_gpt2.py"} <= files
    assert "pytorch_model.bin" not in files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_backpack_gpt2.BackpackGPT2Config",
        "AutoModelForCausalLM": "modeling_backpack_gpt2.BackpackGPT2LMHeadModel",
    }
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    ids = random_batch(0, 2, 16)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded.lm_head.weight is loaded.backpack.gpt2_model.wte.weight


class _NotATensor:
    """Anything but tensors in a `.bin` must be refused: unpickling arbitrary objects runs arbitrary code."""

    def __reduce__(self):
        return (print, ("this should never be unpickled",))


def test_bin_checkpoints_load_only_through_weights_only(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    torch.save({"backpack.gpt2_model.wte.weight": _NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|unsupported"):
        BackpackGPT2LMHeadModel.from_pretrained(tmp_path)


def test_resized_embeddings_stay_tied():
    model = tiny_model()
    model.resize_token_embeddings(140)
    assert model.config.vocab_size == 140
    assert model.lm_head.weight is model.backpack.word_embeddings.weight is model.backpack.gpt2_model.wte.weight
    assert model(torch.tensor([[139, 3]])).logits.shape == (1, 2, 140)


# --- loss -----------------------------------------------------------------------------------------------------


def test_loss_is_shifted_cross_entropy_ignoring_minus_100():
    model = tiny_model()
    ids = random_batch(1, 3, 12)
    labels = ids.clone()
    labels[0, 4:7] = -100
    out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, model.config.vocab_size)
    targets = labels[:, 1:].reshape(-1)
    kept = targets != -100
    by_hand = -F.log_softmax(logits[kept].double(), dim=-1).gather(1, targets[kept, None]).mean()
    assert abs(out.loss.item() - by_hand.item()) < 1e-5


# --- incremental decoding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_cached_decoding_equals_full_forward(seed):
    model = tiny_model(seed)
    ids = random_batch(seed, 2, 20)
    prefix = 1 + seed * 3
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :prefix], use_cache=True)
        steps, cache = [out.logits], out.cache
        for t in range(prefix, ids.shape[1]):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.cache
    assert cache.get_seq_length() == ids.shape[1]
    assert_close(torch.cat(steps, dim=1), full)


def test_cache_holds_contextualization_keys_and_senses():
    model = tiny_model()
    config = model.config
    with torch.no_grad():
        cache = model(random_batch(0, 2, 7), use_cache=True).cache
    assert len(cache.layers) == config.n_layer  # tools that walk the layers see the Transformer's
    backpack_layer = cache.sense_layer
    head_dim = config.n_embd // config.num_senses
    assert backpack_layer.keys.shape == (2, config.num_senses, 7, head_dim)
    assert backpack_layer.values.shape == (2, config.num_senses, 7, config.n_embd)


def test_chunked_prefill_equals_full_forward():
    model = tiny_model(3)
    ids = random_batch(3, 2, 24)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        first = model(ids[:, :9], use_cache=True)
        second = model(ids[:, 9:], cache=first.cache, use_cache=True)
    assert_close(torch.cat([first.logits, second.logits], dim=1), full)


# --- padding and batching -------------------------------------------------------------------------------------


def left_padded(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.stack([F.pad(r, (width - len(r), 0), value=pad_id) for r in rows])
    mask = torch.stack([F.pad(torch.ones_like(r), (width - len(r), 0)) for r in rows])
    return ids, mask


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("seed", range(3))
def test_left_padded_batch_equals_each_row_alone(seed, attn_implementation):
    model = tiny_model(seed, attn_implementation=attn_implementation)
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 16, (4,), generator=generator)
    rows = [torch.randint(1, 128, (int(n),), generator=generator) for n in lengths]
    ids, mask = left_padded(rows)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, output_contextualization=True)
        for row_index, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            assert_close(batched.logits[row_index, -len(row) :], alone)
    # Padded keys get zero weight in every sense, for every real query.
    alpha = batched.contextualization
    real_queries = mask.bool()[:, None, :, None]
    padded_keys = ~mask.bool()[:, None, None, :]
    assert torch.all(alpha.masked_select(real_queries & padded_keys) == 0)


def test_right_padded_batch_equals_each_row_alone():
    model = tiny_model(5)
    rows = [random_batch(7, 1, 9)[0], random_batch(8, 1, 5)[0]]
    ids = torch.stack([F.pad(r, (0, 9 - len(r))) for r in rows])
    mask = torch.stack([F.pad(torch.ones_like(r), (0, 9 - len(r))) for r in rows])
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for i, row in enumerate(rows):
            assert_close(batched[i, : len(row)], model(row[None]).logits[0])


def test_left_padded_generation_equals_each_row_alone():
    model = tiny_model(2)
    rows = [random_batch(11, 1, 4)[0], random_batch(12, 1, 10)[0], random_batch(13, 1, 7)[0]]
    ids, mask = left_padded(rows)
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    batched = model.generate(ids, attention_mask=mask, **settings)[:, ids.shape[1] :]
    for i, row in enumerate(rows):
        alone = model.generate(row[None], attention_mask=torch.ones_like(row[None]), **settings)[0, len(row) :]
        assert torch.equal(batched[i], alone)


# --- attention paths ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_sdpa_equals_eager(seed):
    ids = random_batch(seed, 3, 30)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    outputs = {}
    for implementation in ("eager", "sdpa"):
        model = tiny_model(seed, attn_implementation=implementation)
        assert model.config._attn_implementation == implementation
        with torch.no_grad():
            outputs[implementation] = model(ids, attention_mask=mask).logits
    assert_close(outputs["sdpa"], outputs["eager"])


def test_sense_sum_never_forms_alpha_unless_weights_are_asked_for():
    model = tiny_model()
    ids = random_batch(0, 2, 24)
    padded = torch.ones_like(ids)
    padded[0, :3] = 0
    flash = "aten::_scaled_dot_product_flash_attention_for_cpu"

    def op_counts(**kwargs) -> dict[str, int]:
        with torch.profiler.profile() as profile, torch.no_grad():
            model(ids, use_cache=False, **kwargs)
        return {event.key: event.count for event in profile.key_averages()}

    # An unpadded batch on a CPU: the blockwise causal sum (α one block of queries at a time); GPT-2's layers
    # alone run the fused attention kernel.
    unpadded = op_counts()
    assert unpadded.get("BlockwiseCausalSenseSum") == 1
    assert unpadded.get(flash) == model.config.n_layer
    # A padded batch: the fused kernel with the mask, for the layers and the sense sum.
    masked = op_counts(attention_mask=padded)
    assert "BlockwiseCausalSenseSum" not in masked
    assert masked.get(flash) == model.config.n_layer + 1
    assert not any("attention_math" in op for op in (*unpadded, *masked))
    materialised = tiny_model(attn_implementation="eager")
    with torch.no_grad():
        assert materialised(ids, output_contextualization=True).contextualization.shape == (2, 4, 24, 24)
    assert model(ids).contextualization is None


def sense_sum_inputs(seed: int, length: int, batch: int = 2, num_senses: int = 4, embed_dim: int = 32):
    """Random float64 queries, keys (batch, k, seq, d/k) and senses (batch, k, seq, d) that require gradients;
    the senses in the layout the sense network and the word table give them."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, num_senses, length, embed_dim // num_senses)
    queries = torch.randn(shape, dtype=torch.float64, generator=generator)
    keys = torch.randn(shape, dtype=torch.float64, generator=generator)
    senses = torch.randn(batch, length, num_senses, embed_dim, dtype=torch.float64, generator=generator)
    return [tensor.requires_grad_() for tensor in (queries, keys, senses.transpose(1, 2))]


@pytest.mark.parametrize("seed, length", [(0, 1), (1, 63), (2, 64), (3, 150)])
def test_blockwise_sense_sum_equals_fused_and_materialised_sums_and_their_gradients(seed, length):
    scaling = 0.5
    causal = sense_attention_mask(None, torch.arange(length), length)
    paths = {
        "blockwise": lambda q, k, c: BlockwiseCausalSenseSum.apply(q, k, c, scaling, CAUSAL_SENSE_SUM_BLOCK),
        "fused": lambda q, k, c: fused_weighted_sense_sum(q, k, c, None, scaling),
        "materialised": lambda q, k, c: weighted_sense_sum(contextualization_weights(q, k, causal, scaling), c),
    }
    grad_output = torch.randn(2, length, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    results = {}
    for name, path in paths.items():
        inputs = sense_sum_inputs(seed, length)
        output = path(*inputs)
        output.backward(grad_output)
        results[name] = [output.detach()] + [tensor.grad for tensor in inputs]
    for name in ("fused", "materialised"):
        for blockwise, other in zip(results["blockwise"], results[name]):
            # atol: with one key, q and k get no gradient (0 here, rounding-sized elsewhere)
            torch.testing.assert_close(blockwise, other, rtol=1e-10, atol=1e-12)


def test_blockwise_sense_sum_gradients_pass_gradcheck_across_blocks():
    queries, keys, senses = sense_sum_inputs(5, 11, batch=1, num_senses=2, embed_dim=4)
    assert torch.autograd.gradcheck(lambda q, k, c: BlockwiseCausalSenseSum.apply(q, k, c, 0.7, 4),
                                    (queries, keys, senses))


def test_contextualization_is_causal_and_normalised():
    model = tiny_model()
    with torch.no_grad():
        alpha = model(random_batch(0, 2, 10), output_contextualization=True).contextualization
    assert alpha.shape == (2, 4, 10, 10)
    assert torch.allclose(alpha.sum(-1), torch.ones(2, 4, 10))
    assert torch.all(alpha.triu(1) == 0)


def test_hidden_states_of_the_contextualization_network():
    model = tiny_model()
    out = model(random_batch(0, 1, 5), output_hidden_states=True)
    assert len(out.hidden_states) == model.config.n_layer + 1


# --- training -------------------------------------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = random_batch(4, 2, 16)

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = tiny_model(4)
        model.train()
        if checkpointing:
            # transformers 5.24's name; before it, only the old one exists.
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
            assert model.backpack.sense_network.gradient_checkpointing
            assert all(block.gradient_checkpointing for block in model.backpack.gpt2_model.h)
        model(ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


# --- generation -----------------------------------------------------------------------------------------------


def test_greedy_generation_matches_argmax_of_full_forward():
    model = tiny_model(6)
    prompt = random_batch(6, 1, 5)
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    sequence = prompt
    for _ in range(8):
        with torch.no_grad():
            next_token = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(generated, sequence)


def test_beam_search_with_cache_equals_beam_search_without():
    model = tiny_model(7)
    prompt = random_batch(7, 2, 6)
    settings = dict(max_new_tokens=8, num_beams=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    cached = model.generate(prompt, use_cache=True, **settings)
    uncached = model.generate(prompt, use_cache=False, **settings)
    assert cached.shape == (2, 14)
    assert torch.equal(cached, uncached)


def test_sampling_is_seeded_and_in_vocabulary():
    model = tiny_model(8)
    prompt = random_batch(8, 2, 4)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(model.generate(prompt, max_new_tokens=10, do_sample=True, top_k=20, eos_token_id=None,
                                   pad_token_id=0))
    assert torch.equal(runs[0], runs[1])
    assert runs[0].shape == (2, 14) and int(runs[0].max()) < 128


def test_sense_weights_of_one_change_nothing_and_weights_survive_the_cache():
    model = tiny_model(9)
    ids = random_batch(9, 2, 12)
    weights = torch.rand(2, 4, 12, generator=torch.Generator().manual_seed(0)) + 0.5
    with torch.no_grad():
        plain = model(ids).logits
        assert_close(model(ids, sense_weights=torch.ones(1, 4, 12)).logits, plain)
        weighted = model(ids, sense_weights=weights).logits[:, -1]
        prefix = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], cache=prefix.cache, sense_weights=weights).logits[:, -1]
    assert not torch.allclose(weighted, plain[:, -1])
    assert_close(step, weighted)


def test_sense_edit_acts_everywhere_and_removal_restores_exact_logits():
    model = tiny_model(10)
    ids = random_batch(10, 2, 16)
    word = int(ids[0, 3])
    with torch.no_grad():
        before = model(ids).logits
        model.set_sense_edit(word, torch.zeros(4, 32))
        edited = model(ids).logits
        assert torch.all(model.sense_vectors([word]) == 0)
        model.remove_sense_edits()
        after = model(ids).logits
    assert not torch.allclose(edited, before)
    assert torch.equal(after, before)


@pytest.mark.parametrize(("senses", "message"), [
    (torch.zeros(3, 32), "shape"),
    (torch.full((4, 32), float("nan")), "NaN"),
])
def test_bad_sense_edits_are_refused(senses, message):
    with pytest.raises(ValueError, match=message):
        tiny_model().set_sense_edit(5, senses)


def test_precomputed_sense_table_gives_the_same_outputs_and_is_not_used_in_training():
    model = tiny_model(11)
    ids = random_batch(11, 2, 16)
    with torch.no_grad():
        computed = model(ids).logits
        generated = model.generate(ids[:, :4], max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
        model.precompute_senses(chunk_size=50)
        assert model.backpack.sense_table.shape == (4, 128, 32)
        assert_close(model(ids).logits, computed)
        assert torch.equal(model.generate(ids[:, :4], max_new_tokens=6, do_sample=False, eos_token_id=None,
                                          pad_token_id=0), generated)
    model.train()
    model(ids, labels=ids).loss.backward()
    assert model.backpack.sense_network.final_mlp.c_proj.weight.grad is not None
    model.resize_token_embeddings(130)
    assert model.backpack.sense_table is None


# --- bad input ------------------------------------------------------------------------------------------------


def test_token_id_outside_vocabulary_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"token id 128.*\[0, 128\)"):
        model(torch.tensor([[1, 128]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="token id 500"):
        model.sense_vectors([500])


def test_too_long_sequence_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="65 .*n_positions=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with torch.no_grad():
        cache = model(torch.zeros(1, 60, dtype=torch.long), use_cache=True).cache
    with pytest.raises(ValueError, match="cached 60 \\+ new 5.*n_positions=64"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_empty_input_and_nan_sense_weights_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"empty input: input_ids has shape \(1, 0\); give at least one token"):
        model(torch.zeros(1, 0, dtype=torch.long))
    weights = torch.ones(1, 4, 3)
    weights[0, 2, 1] = float("nan")
    with pytest.raises(ValueError, match="sense_weights contains NaN or inf"):
        model(torch.tensor([[1, 2, 3]]), sense_weights=weights)
    with pytest.raises(ValueError, match="sense_weights contains NaN or inf"):
        model(torch.tensor([[1, 2, 3]]), sense_weights=lambda ids, past: torch.full((1, 4, 3), float("inf")))


def test_mismatched_attention_mask_is_refused():
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 5\), expected .* \(2, 6\)"):
        tiny_model()(torch.zeros(2, 6, dtype=torch.long), attention_mask=torch.ones(2, 5))


def test_inputs_embeds_and_ids_together_are_refused():
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        tiny_model()(torch.zeros(1, 3, dtype=torch.long), inputs_embeds=torch.zeros(1, 3, 32))
    with pytest.raises(ValueError, match=r"inputs_embeds must have shape \(batch, seq, n_embd=32\)"):
        tiny_model()(inputs_embeds=torch.zeros(1, 3, 31))


# --- tokenizer, pipeline and a fresh process ------------------------------------------------------------------


def test_tokenizer_is_gpt2():
    tokenizer = gpt2_tokenizer()
    assert tokenizer("Hello world").input_ids == [15496, 995]
    assert len(tokenizer) == 50257 and tokenizer.eos_token_id == 50256 and tokenizer.pad_token_id == 50256


FRESH_PROCESS = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
    folder = sys.argv[1]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer(["The river bank", "A"], return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape == (2, inputs.input_ids.shape[1] + 5), out.shape
    generator = pipeline("text-generation", model=folder, trust_remote_code=True)
    single = generator("The river bank", max_new_tokens=5, do_sample=False)
    batched = generator(["Hello world", "The"], max_new_tokens=4, do_sample=False, batch_size=2)
    assert single[0]["generated_text"].startswith("The river bank"), single
    assert len(batched) == 2 and batched[0][0]["generated_text"].startswith("Hello world"), batched
    print("OK", type(model).__module__)
    """
)


def test_generate_and_pipeline_from_saved_folder_in_fresh_process(tmp_path):
    model = tiny_model(vocab_size=50264, n_positions=32)
    model.generation_config.pad_token_id = 50256
    model.save_pretrained(tmp_path)
    gpt2_tokenizer().save_pretrained(tmp_path)
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # Loaded as remote code from the folder, not from this checkout.
    assert "OK transformers_modules" in result.stdout
    assert str(REPO) not in result.stdout
