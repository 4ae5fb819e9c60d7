"""The ``backpack`` command line on a folder exported like the trainer does (save_pretrained of model and tokenizer),
loaded the Hub way (AutoModelForCausalLM, trust_remote_code). Also: interventions inside `pipeline()`.
"""

import os
import subprocess
import sys

import pytest
import torch
from conftest import save_tiny_folder

from backpack.cli import main
from backpack.interventions import scale_sense
from backpack.tokenizer import gpt2_tokenizer
from backpack.words import load_model
from configuration_backpack_gpt2 import BackpackGPT2Config
from modeling_backpack_gpt2 import BackpackGPT2LMHeadModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_folder(tmp_path_factory.mktemp("exported"))


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


@pytest.fixture
def no_model_loading(monkeypatch):
    """Make loading the model an error: the checks under test must refuse the input before the model is loaded."""
    import backpack.cli

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(backpack.cli, "load_model", refuse)


def test_top_beyond_the_vocabulary_lists_all_of_it_with_a_note(folder, capsys):
    readable = len(gpt2_tokenizer())  # 50257 printable ids (the model's 50264 rows include padding)
    status, out, err = run(capsys, "intervene", folder, "Hi", "--scale", "bank:1:0", "--top", "100000000")
    assert status == 0
    assert f"--top 100000000 is more than the {readable} words of the vocabulary; listing all {readable}" in err
    rows = out.splitlines()[out.splitlines().index(next(l for l in out.splitlines() if l.startswith("next word"))) + 1:]
    assert len(rows) == readable
    status, out, err = run(capsys, "senses", folder, "bank", "--senses", "0", "--no-bottom", "--top", "100000000")
    assert status == 0 and f"listing all {readable}" in err
    assert out.splitlines()[-1].count(" +") + out.splitlines()[-1].count(" -") >= readable  # every word's logit


@pytest.mark.parametrize(
    "argv",
    [
        ["senses", "{folder}", "bank", "--png", "{missing}/x.png"],
        ["explain", "{folder}", "Hi there", "--target", "he", "--png", "{ok}/c.png", "--alpha-png", "{missing}/a.png"],
    ],
)
def test_png_in_a_missing_folder_is_refused_before_any_work(folder, capsys, tmp_path, no_model_loading, argv):
    missing = tmp_path / "no-such-folder"
    ok = tmp_path / "ok"
    ok.mkdir()
    status, out, err = run(capsys, *[a.format(folder=folder, missing=missing, ok=ok) for a in argv])
    assert status == 2 and f"folder {str(missing)!r} does not exist" in err
    assert out == "" and list(tmp_path.rglob("*")) == [ok]  # nothing written, not even the valid --png


def test_png_is_written_atomically(folder, capsys, tmp_path):
    png = tmp_path / "senses.png"
    png.write_bytes(b"old")
    status, out, _ = run(capsys, "senses", folder, "bank", "--senses", "0", "--png", str(png))
    assert status == 0 and f"saved {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["senses.png"]  # no temporary file left behind


def test_a_word_typed_with_its_leading_space_is_that_token(folder, capsys):
    bank = gpt2_tokenizer().encode(" bank")
    assert len(bank) == 1
    status, with_space, _ = run(capsys, "senses", folder, " bank", "--senses", "0", "1", "--top", "3")
    assert status == 0 and f"word ' bank'  token ids {bank}" in with_space
    status, without, _ = run(capsys, "senses", folder, "bank", "--senses", "0", "1", "--top", "3")
    assert with_space.splitlines()[1:] == without.splitlines()[1:]  # same senses, same words


@pytest.mark.parametrize("word", ["#-5", "#3.5", "#12abc", "#+-1"])
def test_an_invalid_token_id_is_an_error_not_text(folder, capsys, no_model_loading, word):
    status, _, err = run(capsys, "senses", folder, word)
    assert status == 2 and f"invalid token id {word!r}" in err


def test_an_invalid_token_id_inside_an_edit_is_refused_by_argparse(folder, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["intervene", folder, "Hi", "--edit", "bank:#-5:HP"])
    assert exit_info.value.code == 2 and "invalid token id '#-5'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, value",
    [("--top-p", "nan"), ("--top-p", "inf"), ("--top-p", "0"), ("--top-p", "1.5"), ("--max-new-tokens", "0"),
     ("--sample-size", "-1")],
)
def test_generate_settings_are_refused_by_argparse(folder, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", folder, "Hi", flag, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"argument {flag}" in err and value in err


@pytest.mark.parametrize("argv", [["intervene", "{folder}", "Hi", "--scale", "bank:1:0", "--top", "0"],
                                  ["senses", "{folder}", "bank", "--top", "-3"],
                                  ["bias", "{folder}", "--scales", "0:inf:0.5"],
                                  ["bias", "{folder}", "--scales", "0,nan"]])
def test_counts_and_grids_are_refused_by_argparse(folder, capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(folder=folder) for a in argv])
    assert exit_info.value.code == 2 and "error: argument" in capsys.readouterr().err


def test_max_new_tokens_beyond_the_positions_is_capped_with_a_note(folder, capsys):
    positions = BackpackGPT2Config.from_pretrained(folder).n_positions
    prompt = "The river bank"
    room = positions - len(gpt2_tokenizer().encode(prompt))
    status, out, err = run(capsys, "generate", folder, prompt, "--max-new-tokens", "1000", "--greedy")
    assert status == 0
    assert (f"--max-new-tokens 1000 capped at {room}: the model has {positions} positions and the prompt takes "
            f"{positions - room} token(s)") in err
    status, out_exact, err_exact = run(capsys, "generate", folder, prompt, "--max-new-tokens", str(room), "--greedy")
    assert status == 0 and "capped" not in err_exact and out_exact == out  # the cap is exactly the room left
    status, _, err = run(capsys, "intervene", folder, prompt, "--scale", "bank:1:0", "--generate", "1000")
    assert status == 0 and f"--generate 1000 capped at {room}" in err


@pytest.mark.parametrize(
    "content, message",
    [
        (b"cord;smile;0.02\nrooster;voyage;0.04\nthis line is not a pair\n", "{path}:3: expected 'word word score'"),
        (b"gem jewel 3.94\nboy lad nan\nnoon string 0.04\n", "{path}:2: the score 'nan' is not a finite number"),
        (b"gem jewel 3.94\nboy lad 3.82\n\x89PNG\r\n\x1a\n\xff\xfe", "{path}:3: not UTF-8 text"),
        (b"Word 1,Word 2,Human (mean)\ngem,jewel,3.94\n", "has 1 (word, word, score) line(s)"),
        (b"gem jewel 2\nboy lad 2\nnoon string 2\n", "all 3 scores in {path!r} are equal"),
    ],
)
def test_a_malformed_ratings_file_is_refused_naming_file_and_line(folder, capsys, tmp_path, no_model_loading,
                                                                 content, message):
    path = tmp_path / "rg65.txt"
    path.write_bytes(content)
    status, out, err = run(capsys, "similarity", folder, "--rg65", str(path))
    assert status == 2 and message.format(path=str(path)) in err and out == ""


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "{folder}", ""], "empty prompt ''"),
        (["generate", "{folder}", "  \n "], "empty prompt"),
        (["intervene", "{folder}", "", "--scale", "bank:1:0"], "empty prompt ''"),
        (["explain", "{folder}", " ", "--target", "he"], "empty text ' '"),
    ],
)
def test_an_empty_prompt_is_refused_before_the_model_is_loaded(folder, capsys, no_model_loading, argv, message):
    status, _, err = run(capsys, *[a.format(folder=folder) for a in argv])
    assert status == 2 and message in err


@pytest.fixture(scope="module")
def nan_folder(tmp_path_factory):
    """An exported Backpack one of whose sense-network weights is NaN."""
    torch.manual_seed(0)
    config = BackpackGPT2Config(n_embd=32, n_layer=1, n_head=2, num_senses=4, n_positions=64, initializer_range=0.1)
    model = BackpackGPT2LMHeadModel(config)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "sense_network" in n and p.dim() == 2)[0, 0] = float("nan")
    path = tmp_path_factory.mktemp("nan-model")
    model.save_pretrained(path)
    gpt2_tokenizer().save_pretrained(path)
    return str(path)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["senses", "{folder}", "bank"], "the sense logits E·C(x): "),
        (["explain", "{folder}", "Hi there", "--target", "he"], "the model's logits at position 1: "),
        (["intervene", "{folder}", "Hi", "--scale", "bank:1:0"], "the model's next-word logits: "),
        (["bias", "{folder}", "--sense", "1", "--professions", "nurse"], "the he/she logits for 'nurse': "),
        (["similarity", "{folder}", "--subword", "first"], "the sense vectors of the rated words: "),
    ],
)
def test_nan_results_are_an_error_not_a_number(nan_folder, capsys, monkeypatch, argv, message):
    import backpack.loading

    # The loader refuses NaN weights (tests/test_bad_input.py); let them past it to reach the toolkit's own checks,
    # which guard against results that overflow from finite weights.
    monkeypatch.setattr(backpack.loading, "check_finite_weights", lambda *args, **kwargs: None)
    status, out, err = run(capsys, *[a.format(folder=nan_folder) for a in argv])
    assert status == 2 and message in err and "values are NaN or infinite" in err
    assert "nan" not in out.lower()


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
