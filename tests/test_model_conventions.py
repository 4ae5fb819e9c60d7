"""The conventions tools built for transformers models rely on, checked on the Backpack beside GPT-2 itself.

Attention visualisers read `outputs.attentions`, probing libraries `hidden_states` (also switched on through the
config), prompt tuning passes `inputs_embeds`, the generation utilities walk `cache.layers` and crop or reorder
the cache, and weights move between the base model and the LM head model by the base-model prefix.
"""

import pytest
import torch
from accelerate import PartialState
from accelerate.utils import clean_state_dict_for_safetensors
from conftest import TINY_CHECKPOINT, tiny_config, tiny_model
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from modeling_backpack_gpt2 import CACHE_ARGUMENT, BackpackGPT2LMHeadModel, BackpackGPT2Model


def gpt2_twin(**overrides) -> GPT2LMHeadModel:
    """GPT-2 with the Backpack's contextualization-network shape: the reference for every convention."""
    settings = dict(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                    eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    settings.update(overrides)
    return GPT2LMHeadModel(GPT2Config(**settings)).eval()


IDS = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(0))


# --- attentions and hidden states -----------------------------------------------------------------------------


def test_output_attentions_returns_one_map_per_layer_like_gpt2():
    model = tiny_model(attn_implementation="eager")
    with torch.no_grad():
        attentions = model(IDS, output_attentions=True).attentions
        reference = gpt2_twin(attn_implementation="eager")(IDS, output_attentions=True).attentions
    assert len(attentions) == len(reference) == model.config.n_layer
    assert all(a.shape == r.shape == (2, 2, 7, 7) for a, r in zip(attentions, reference))
    assert torch.allclose(attentions[0].sum(-1), torch.ones(2, 2, 7))
    assert torch.all(attentions[1].triu(1) == 0)  # causal


@pytest.mark.parametrize(
    "mode",
    [dict(do_sample=False), dict(do_sample=True), dict(num_beams=2), dict(prompt_lookup_num_tokens=2), "assisted"],
    ids=["greedy", "sample", "beam", "prompt-lookup", "assisted"],
)
def test_generate_returns_attentions_in_every_decoding_mode(mode):
    model = tiny_model(attn_implementation="eager")
    if mode == "assisted":
        mode = dict(assistant_model=tiny_model(1, attn_implementation="eager"), do_sample=False)
    out = model.generate(IDS[:1], max_new_tokens=3, pad_token_id=0, eos_token_id=None, output_attentions=True,
                         return_dict_in_generate=True, **mode)
    assert len(out.attentions) == 3  # one entry per generated token ...
    assert all(len(step) == model.config.n_layer for step in out.attentions)  # ... of one map per layer
    assert out.attentions[0][0].shape[-2:] == (7, 7)  # the prompt's own map comes first


def test_config_switches_hidden_states_and_attentions_on():
    model = tiny_model(attn_implementation="eager", output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        out = model(IDS)
        base = model.backpack(IDS)
    assert len(out.hidden_states) == len(base.hidden_states) == model.config.n_layer + 1
    assert len(out.attentions) == model.config.n_layer


def test_gradients_can_be_retained_on_hidden_states_and_attentions():
    model = tiny_model(attn_implementation="eager").train()
    out = model(IDS, output_hidden_states=True, output_attentions=True)
    hidden, attention = out.hidden_states[0], out.attentions[0]
    hidden.retain_grad()
    attention.retain_grad()
    # The last position: at position 0, α is 1 whatever GPT-2 says, so no gradient reaches its states there.
    out.logits[0, -1].sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    assert attention.grad is not None and attention.grad.abs().sum() > 0


def test_base_model_returns_a_tuple_when_asked():
    model = BackpackGPT2Model(tiny_config()).eval()
    with torch.no_grad():
        as_tuple = model(IDS, return_dict=False, output_hidden_states=True)
        as_output = model(IDS, output_hidden_states=True)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], as_output.last_hidden_state)
    assert len(as_tuple) == len(as_output.to_tuple())
    lm_tuple = tiny_model()(IDS, return_dict=False)
    assert isinstance(lm_tuple, tuple) and lm_tuple[0].shape == (2, 7, 128)


# --- inputs_embeds --------------------------------------------------------------------------------------------


def test_inputs_embeds_of_the_word_embeddings_equal_the_ids_path():
    model = tiny_model(4)
    embeddings = model.get_input_embeddings()(IDS)
    mask = torch.ones_like(IDS)
    mask[0, :2] = 0
    with torch.no_grad():
        by_ids = model(IDS, attention_mask=mask, output_senses=True)
        by_embeddings = model(inputs_embeds=embeddings, attention_mask=mask, output_senses=True)
    torch.testing.assert_close(by_embeddings.logits, by_ids.logits)
    torch.testing.assert_close(by_embeddings.senses, by_ids.senses)


def test_soft_prompt_gets_gradients_and_generation_starts_from_embeddings():
    model = tiny_model(4)
    soft_prompt = torch.nn.Parameter(torch.randn(1, 3, 32) * 0.02)
    words = model.get_input_embeddings()(IDS[:1])
    model(inputs_embeds=torch.cat([soft_prompt, words], dim=1)).logits[0, -1].logsumexp(-1).backward()
    assert soft_prompt.grad is not None and soft_prompt.grad.abs().sum() > 0

    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    from_ids = model.generate(IDS[:1], **settings)[:, IDS.shape[1]:]
    from_embeddings = model.generate(inputs_embeds=words.detach(), **settings)
    assert torch.equal(from_embeddings[:, -5:], from_ids)


# --- the cache ------------------------------------------------------------------------------------------------


def test_cache_has_one_layer_per_decoder_layer_like_gpt2():
    model = tiny_model()
    with torch.no_grad():
        cache = model(IDS, use_cache=True).cache
        reference = gpt2_twin()(IDS, use_cache=True)[1]  # `past_key_values` before transformers 5.24, then `cache`
    assert len(cache.layers) == len(reference.layers) == model.config.n_layer
    assert cache.get_seq_length() == reference.get_seq_length() == 7
    assert cache.sense_layer.keys.shape == (2, 4, 7, 8) and cache.sense_layer.values.shape == (2, 4, 7, 32)


def test_cropped_cache_continues_like_a_shorter_prompt():
    model = tiny_model(5)
    with torch.no_grad():
        cache = model(IDS, use_cache=True).cache
        cache.crop(-3)  # drop the last 3 positions
        assert cache.get_seq_length() == 4 and cache.sense_layer.get_seq_length() == 4
        continued = model(IDS[:, 4:], cache=cache).logits
        torch.testing.assert_close(continued, model(IDS).logits[:, 4:])


def test_generation_continues_from_a_returned_cache():
    model = tiny_model(6)
    settings = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    first = model.generate(IDS[:1], max_new_tokens=3, return_dict_in_generate=True, **settings)
    # The cache's name in generate()'s output and arguments: `past_key_values` before transformers 5.24.
    cache = first[CACHE_ARGUMENT]
    continued = model.generate(first.sequences, max_new_tokens=3, **{CACHE_ARGUMENT: cache}, **settings)
    assert torch.equal(continued, model.generate(IDS[:1], max_new_tokens=6, **settings))


def test_beam_search_reorders_the_sense_layer_too():
    model = tiny_model(7)
    settings = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(IDS, **settings), model.generate(IDS, use_cache=False, **settings))


# --- weights: round trips, tied aliases, base <-> LM head -----------------------------------------------------


def saved_by(saver: str, model: BackpackGPT2LMHeadModel, folder) -> None:
    """`model` written to `folder` the way `saver` writes checkpoints."""
    if saver == "save_pretrained":
        model.save_pretrained(folder)
        return
    model.config.save_pretrained(folder)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    if saver == "torch.save (published .bin)":
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:  # Accelerate's save_state / save_model: one name kept per shared tensor
        PartialState()  # Accelerate's logging (it warns about the removed aliases) needs its state
        state = clean_state_dict_for_safetensors(dict(model.state_dict()))
        save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors",
                  metadata={"format": "pt"})


@pytest.mark.parametrize("saver", ["save_pretrained", "torch.save (published .bin)", "accelerate"])
def test_reload_keeps_every_weight_and_reports_none_missing(saver, tmp_path, caplog):
    model = tiny_model(8)
    saved_by(saver, model, tmp_path)
    reloaded, info = BackpackGPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    embeddings = reloaded.backpack
    assert embeddings.word_embeddings.weight is embeddings.gpt2_model.wte.weight is reloaded.lm_head.weight
    assert embeddings.position_embeddings.weight is embeddings.gpt2_model.wpe.weight
    assert "MISSING" not in caplog.text and "newly initialized" not in caplog.text


def test_base_model_and_lm_head_model_load_each_other(tmp_path):
    model = tiny_model(9)
    model.save_pretrained(tmp_path / "lm")
    base, info = BackpackGPT2Model.from_pretrained(tmp_path / "lm", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        torch.testing.assert_close(base(IDS).last_hidden_state, model.backpack(IDS).last_hidden_state)
    base.save_pretrained(tmp_path / "base")
    lm, info = BackpackGPT2LMHeadModel.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        torch.testing.assert_close(lm(IDS).logits, model(IDS).logits)


def test_published_layout_loads_into_the_base_model():
    base, info = BackpackGPT2Model.from_pretrained(TINY_CHECKPOINT, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert base.base_model_prefix == "backpack"


@pytest.mark.parametrize("model_class", [BackpackGPT2LMHeadModel, BackpackGPT2Model])
def test_a_file_without_weights_reports_every_parameter_missing(model_class, tmp_path):
    """transformers' `test_model_weights_reload_no_missing_tied_weights`: the embeddings' second names are tied
    weights, so a checkpoint lacking E and P says so and they are initialised, not left unloaded."""
    model_class(tiny_config()).save_pretrained(tmp_path)
    save_file({"tensor": torch.tensor([1, 2])}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    reloaded, info = model_class.from_pretrained(tmp_path, output_loading_info=True)
    assert {name for name, _ in reloaded.named_parameters()} <= set(info["missing_keys"])
    backpack = getattr(reloaded, "backpack", reloaded)
    embedding = backpack.gpt2_model.wte.weight  # initialised (std 0.02), not left on the meta device
    assert embedding.device.type == "cpu" and 0.015 < embedding.std().item() < 0.025
    assert backpack.word_embeddings.weight is backpack.gpt2_model.wte.weight
    assert backpack.position_embeddings.weight is backpack.gpt2_model.wpe.weight
