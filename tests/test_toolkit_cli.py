"""The ``backpack`` command line on a folder exported like the trainer does (save_pretrained of model and tokenizer),
loaded the Hub way (AutoModelForCausalLM, trust_remote_code). Also: interventions inside `pipeline()`.
"""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from backpack.cli import main  # noqa: E402
from backpack.interventions import scale_sense  # noqa: E402
from backpack.tokenizer import gpt2_tokenizer  # noqa: E402
from backpack.words import load_model  # noqa: E402
from configuration_backpack_gpt2 import BackpackGPT2Config  # noqa: E402
from modeling_backpack_gpt2 import BackpackGPT2LMHeadModel  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    config = BackpackGPT2Config(n_embd=32, n_layer=2, n_head=2, num_senses=4, n_positions=64, initializer_range=0.1)
    path = tmp_path_factory.mktemp("exported")
    BackpackGPT2LMHeadModel(config).save_pretrained(path)
    gpt2_tokenizer().save_pretrained(path)
    return str(path)


def run(capsys, *argv):
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_senses(folder, capsys, tmp_path):
    png = tmp_path / "senses.png"
    status, out, _ = run(capsys, "senses", folder, "bank", "salesperson", "#318", "--top", "3", "--png", str(png))
    assert status == 0
    assert "word 'bank'" in out and "avg(' sales', 'person')" in out and "word 318" in out
    assert png.stat().st_size > 1000


def test_explain(folder, capsys, tmp_path):
    png, alpha = tmp_path / "contributions.png", tmp_path / "alpha.png"
    status, out, _ = run(capsys, "explain", folder, "The nurse said that", "--target", "he", "--contrast", "she",
                         "--png", str(png), "--alpha-png", str(alpha))
    assert status == 0 and "contributions" in out and "rank" in out
    assert png.stat().st_size > 1000 and alpha.stat().st_size > 1000


def test_intervene_and_generate(folder, capsys):
    status, out, _ = run(capsys, "intervene", folder, "The nurse said that", "--scale", "nurse:1:0",
                         "--edit", "MacBook:Apple:HP", "--generate", "5")
    assert status == 0 and "applied: sense 1 of 'nurse' x 0" in out and "greedy after" in out
    status, out, _ = run(capsys, "generate", folder, "My day was", "--topic", "arts_culture", "--strength", "2",
                         "--max-new-tokens", "6", "--sample-size", "256", "--compare")
    assert status == 0 and "[strength 2]" in out and "bag tokens generated" in out
    status, out, _ = run(capsys, "generate", folder, "My day was", "--bag", "music,song", "--strength", "0",
                         "--max-new-tokens", "4", "--greedy")
    assert status == 0 and "strength 0" in out


def test_bias_and_similarity(folder, capsys):
    status, out, _ = run(capsys, "bias", folder, "--sense", "2", "--scales", "0:1:0.5", "--name", "tiny",
                         "--professions", "nurse,salesperson,CEO")
    assert status == 0 and "| tiny" in out and "per-profession optimal scale of sense 2" in out
    status, out, _ = run(capsys, "similarity", folder, "--name", "tiny")
    assert status == 0 and out.count("SimLex999") >= 2 and "first subword" in out and "average of subwords" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["senses", "{folder}", ""], "empty word"),
        (["senses", "{folder}", "bank", "--senses", "9"], "out of range"),
        (["intervene", "{folder}", "Hi", "--scale", "bank:1:nan"], "finite"),
        (["intervene", "{folder}", "Hi", "--scale", "bank:7:0.5"], "out of range"),
        (["explain", "{folder}", "Hi there", "--target", "he", "--position", "9"], "out of range"),
        (["generate", "{folder}", "Hi", "--bag", "music", "--strength", "5"], "strength"),
        (["bias", "{folder}"], "out of range"),
        (["bias", "{folder}", "--sense", "1", "--professions", "nurse,,CEO"], "empty word"),
        (["senses", "/no/such/folder", "bank"], "does not exist"),
    ],
)
def test_bad_input_exits_2_with_message(folder, capsys, argv, message):
    status, _, err = run(capsys, *[a.format(folder=folder) for a in argv])
    assert status == 2 and message in err


def test_interventions_act_in_the_pipeline(folder):
    from transformers import pipeline

    model, tokenizer = load_model(folder)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "return_full_text": False}
    plain = generator("The nurse said that the nurse", **kwargs)[0]["generated_text"]
    prompt_ids = torch.tensor([tokenizer.encode("The nurse said that the nurse")])
    with scale_sense(model, "nurse", 1, 40.0, tokenizer):
        edited = generator("The nurse said that the nurse", **kwargs)[0]["generated_text"]
        with torch.no_grad():
            expected = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=8,
                                      do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert edited == tokenizer.decode(expected[0, prompt_ids.shape[1]:])
    assert edited != plain
    assert generator("The nurse said that the nurse", **kwargs)[0]["generated_text"] == plain


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "backpack", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "senses" in result.stdout and "similarity" in result.stdout
