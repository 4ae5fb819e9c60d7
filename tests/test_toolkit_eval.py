"""Gender-bias and lexical-similarity evaluations, end to end on a tiny random Backpack with GPT-2's vocabulary,
checked against direct computations (forward passes of the edited model; explicit cosines and Spearman).
"""

import re

import pytest
import torch
from scipy.stats import spearmanr

from backpack.bias import (
    ESTIMATION_PROMPTS,
    EVALUATION_PROMPTS,
    PROFESSIONS,
    evaluate_bias,
    fill_prompt,
    format_bias_report,
)
from backpack.interventions import scale_sense
from backpack.senses import read_senses, sense_logits, sense_vectors
from backpack.similarity import (
    builtin_datasets,
    format_similarity_table,
    load_pairs,
    similarity_table,
)
from backpack.tokenizer import gpt2_tokenizer
from configuration_backpack_gpt2 import BackpackGPT2Config
from modeling_backpack_gpt2 import BackpackGPT2LMHeadModel

SENSE = 2


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = BackpackGPT2Config(n_embd=32, n_layer=2, n_head=2, num_senses=4, n_positions=64, initializer_range=0.1)
    return BackpackGPT2LMHeadModel(config).eval()


def direct_bias(model, tokenizer, profession, prompts, gamma):
    """mean over prompts of max(p(he)/p(she), p(she)/p(he)), one unpadded forward per prompt, sense scaled by γ."""
    he, she = tokenizer.encode(" he")[0], tokenizer.encode(" she")[0]
    values = []
    with scale_sense(model, profession, SENSE, gamma, tokenizer), torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer.encode(fill_prompt(prompt, profession))])
            probs = torch.softmax(model(ids, use_cache=False).logits[0, -1].double(), dim=-1)
            ratio = probs[he] / probs[she]
            values.append(float(torch.maximum(ratio, 1 / ratio)))
    return values


def test_bias_evaluation_matches_direct_computation(model, tokenizer):
    professions = ["nurse", "salesperson", "CEO", "housekeeper"]  # two of them are several subwords
    scales = [0.0, 0.5, 1.0]
    report = evaluate_bias(model, tokenizer, SENSE, professions, scales=scales, progress=False)
    unmodified, removed, optimal = [], [], []
    for profession, result in zip(professions, report.professions):
        estimation = [sum(direct_bias(model, tokenizer, profession, ESTIMATION_PROMPTS, g)) for g in scales]
        gamma = scales[min(range(len(scales)), key=lambda i: (estimation[i], i))]
        assert result.optimal_scale == pytest.approx(gamma)
        unmodified += direct_bias(model, tokenizer, profession, EVALUATION_PROMPTS, 1.0)
        removed += direct_bias(model, tokenizer, profession, EVALUATION_PROMPTS, 0.0)
        optimal += direct_bias(model, tokenizer, profession, EVALUATION_PROMPTS, gamma)
    worst = 0.0
    for measured, direct in ((report.unmodified, unmodified), (report.removed, removed), (report.optimal, optimal)):
        worst = max(worst, abs(measured - sum(direct) / len(direct)))
    print(f"\nbias scores {report.unmodified:.4f} / {report.removed:.4f} / {report.optimal:.4f}; "
          f"max |analytic - direct| = {worst:.2e}")
    assert report.unmodified > 1.001  # the check is not vacuous
    assert worst <= 1e-5
    assert report.optimal <= report.unmodified + 1e-9  # γ = 1 is on the grid... of the estimation prompts only
    table = format_bias_report(report, "tiny")
    assert "unmodified" in table and f"sense {SENSE} removed" in table


def test_bias_defaults_cover_the_paper(model, tokenizer):
    assert len(PROFESSIONS) == 39 and len(EVALUATION_PROMPTS) == 13 and len(ESTIMATION_PROMPTS) == 5
    with pytest.raises(ValueError, match="out of range"):
        evaluate_bias(model, tokenizer, sense=10, professions=["nurse"], progress=False)
    with pytest.raises(ValueError, match="finite"):
        evaluate_bias(model, tokenizer, SENSE, ["nurse"], scales=[0.0, float("nan")], progress=False)
    with pytest.raises(ValueError, match="empty word"):
        evaluate_bias(model, tokenizer, SENSE, [" "], progress=False)


def test_similarity_matches_direct_computation(model, tokenizer):
    datasets = builtin_datasets()
    results = similarity_table(model, tokenizer, datasets, policy="average")
    assert [r.dataset for r in results] == ["SimLex999", "WordSim353"]
    assert results[0].pairs == 999 and results[1].pairs == 353
    for result in results:
        pairs = load_pairs(datasets[result.dataset])
        human = [s for _, _, s in pairs]
        vectors = {}
        with torch.no_grad():
            for word in {w for a, b, _ in pairs for w in (a, b)}:
                ids = tokenizer.encode(" " + word)
                vectors[word] = (model.sense_vectors(ids).mean(dim=0), model.get_input_embeddings().weight[ids].mean(0))
        per_sense = torch.stack([torch.cosine_similarity(vectors[a][0], vectors[b][0], dim=-1) for a, b, _ in pairs])
        embedding = torch.stack([torch.cosine_similarity(vectors[a][1], vectors[b][1], dim=0) for a, b, _ in pairs])
        for sense in range(4):
            assert result.methods[f"Sim{sense}"] == pytest.approx(spearmanr(per_sense[:, sense], human).statistic,
                                                                  abs=1e-6)
        assert result.methods["Sim_min"] == pytest.approx(spearmanr(per_sense.min(-1).values, human).statistic,
                                                          abs=1e-6)
        assert result.methods["embedding"] == pytest.approx(spearmanr(embedding, human).statistic, abs=1e-6)
    table = format_similarity_table(results, "average", "tiny")
    assert "Sim_min" in table and "SimLex999" in table and "embedding" in table


def test_similarity_reads_rg65_and_simverb_layouts(model, tokenizer, tmp_path):
    rg65 = tmp_path / "rg65.csv"
    rg65.write_text("cord;smile;0.02\nrooster;voyage;0.04\nnoon;string;0.04\ngem;jewel;3.94\nboy;lad;3.82\n")
    simverb = tmp_path / "simverb.txt"
    simverb.write_text("# header\ntake\tremove\tV\t6.81\tSYNONYMS\nwalk\trun\tV\t5.1\tCOHYPONYMS\n"
                       "sleep\teat\tV\t0.5\tNONE\nbuy\tpurchase\tV\t9.2\tSYNONYMS\n")
    assert load_pairs(str(rg65))[3] == ("gem", "jewel", 3.94)
    assert load_pairs(str(simverb))[0] == ("take", "remove", 6.81)
    results = similarity_table(model, tokenizer, {"WordSim353": builtin_datasets()["WordSim353"],
                                                  "RG65": str(rg65), "SimVerb3500": str(simverb)}, policy="first")
    assert [r.dataset for r in results] == ["SimVerb3500", "RG65", "WordSim353"]
    with pytest.raises(ValueError, match="does not exist"):
        load_pairs(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no \\(word, word, score\\)"):
        load_pairs(str(empty))


def test_ratings_files_are_read_strictly(tmp_path):
    layouts = tmp_path / "layouts.txt"
    layouts.write_text("Word 1,Word 2,Human (mean)\nold,new,1.58\nsmart intelligent 9.2\n"
                       "take\tremove\tV\t6.81\tANTONYMS\n\n# comment\nhard;difficult;8.77\n")
    assert load_pairs(str(layouts)) == [("old", "new", 1.58), ("smart", "intelligent", 9.2),
                                        ("take", "remove", 6.81), ("hard", "difficult", 8.77)]
    for content, message in (("a b 1\nc d 2\ne f\n", ":3: expected 'word word score'"),
                             ("a b 1\nc d inf\ne f 2\n", ":2: the score 'inf' is not a finite number"),
                             ("word1 word2 score\nheader again here\na b 1\n", ":2: expected"),
                             ("a b 1\nc d 2\n", "has 2 (word, word, score) line(s)"),
                             ("a b 1\nc d 1\ne f 1\n", "all 3 scores")):
        path = tmp_path / "bad.txt"
        path.write_text(content)
        with pytest.raises(ValueError, match=re.escape(message)):
            load_pairs(str(path))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("a b 1\nc d 2\ncaf\u00e9 bar 3\n".encode("latin-1"))
    with pytest.raises(ValueError, match=re.escape(f"{latin1}:3: not UTF-8 text (byte 0xe9)")):
        load_pairs(str(latin1))


def test_words_given_with_a_space_or_as_ids(tokenizer):
    from backpack.words import parse_word_arg, resolve_word

    assert resolve_word(" bank", tokenizer).token_ids == resolve_word("bank", tokenizer).token_ids
    assert resolve_word(" bank", tokenizer).token_ids == tuple(tokenizer.encode(" bank"))
    assert resolve_word("bank", tokenizer, leading_space=False).token_ids == tuple(tokenizer.encode("bank"))
    assert parse_word_arg("#318") == 318 and parse_word_arg("# 7") == 7 and parse_word_arg("#hashtag") == "#hashtag"
    assert parse_word_arg("#") == "#" and parse_word_arg("-5") == "-5"
    for text in ("#-5", "#3.5", "#1e3", "#.5", "#7x"):
        with pytest.raises(ValueError, match=re.escape(f"invalid token id {text!r}")):
            parse_word_arg(text)


def test_figure_paths_are_checked_and_written_atomically(tmp_path):
    from backpack.plots import check_output_path, plt, save_figure

    with pytest.raises(ValueError, match="does not exist"):
        check_output_path(str(tmp_path / "missing" / "x.png"))
    with pytest.raises(ValueError, match="is a folder"):
        check_output_path(str(tmp_path))
    with pytest.raises(ValueError, match="cannot write the figure as 'docx'"):
        check_output_path(str(tmp_path / "x.docx"))
    with pytest.raises(ValueError, match="empty output path"):
        check_output_path("")
    figure = plt.figure()
    figure.add_subplot().plot([0, 1], [1, 0])
    assert save_figure(figure, str(tmp_path / "x.svg")) == str(tmp_path / "x.svg")
    assert (tmp_path / "x.svg").read_text().lstrip().startswith("<?xml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.svg"]
    assert not plt.get_fignums()  # closed


def test_sense_readout(model, tokenizer):
    vectors, words = sense_vectors(model, ["bank", "salesperson", 318], tokenizer)
    assert vectors.shape == (3, 4, 32)
    with torch.no_grad():
        subwords = model.sense_vectors(tokenizer.encode(" salesperson"))
    assert torch.allclose(vectors[1], subwords.mean(dim=0), atol=1e-6)
    first, _ = sense_vectors(model, ["salesperson"], tokenizer, policy="first")
    assert torch.allclose(first[0], subwords[0], atol=1e-6)
    logits, _ = sense_logits(model, ["bank"], tokenizer)
    assert logits.shape == (1, 4, 50264)
    readout = read_senses(model, ["bank"], tokenizer, top_k=3)
    top_word, top_value = readout.top[0][1][0]
    assert top_value == pytest.approx(float(logits[0, 1, :50257].max()))
    assert words[1].describe("average") == "'salesperson' = avg(' sales', 'person')"
    for bad, message in (([], "no words"), ([""], "empty word"), ([50264], "outside the vocabulary")):
        with pytest.raises(ValueError, match=message):
            sense_vectors(model, bad, tokenizer)
    with pytest.raises(ValueError, match="out of range"):
        read_senses(model, ["bank"], tokenizer, senses=[4])


def test_unknown_word_with_a_closed_vocabulary_tokenizer(model):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from backpack.words import resolve_word

    vocabulary = {"[UNK]": 0, "bank": 1, "river": 2}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    closed = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    assert resolve_word("bank", closed).token_ids == (1,)
    with pytest.raises(ValueError, match="unknown word 'zebra'"):
        resolve_word("zebra", closed)
    with pytest.raises(ValueError, match="unknown word"):
        sense_vectors(model, ["river", "zebra"], closed)
