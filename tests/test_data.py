"""Pretraining data: the embedded corpus, packing, local files, the disk cache, configs and clear errors."""

import json
import os

import datasets
import pytest
import torch

from backpack.tokenizer import gpt2_tokenizer
from backpack_train import data as train_data
from backpack_train.config import DataArguments, TrainArguments, gradient_accumulation_steps, parse_args
from backpack_train.data import (
    PAD_TOKEN,
    check_data_source,
    collate_blocks,
    embedded_documents,
    load_documents,
    pack_documents,
    prepare_datasets,
    tokenize_and_pack,
)

EOS = 50256


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


def unpack(blocks: list[list[int]]) -> list[int]:
    """The token stream back from blocks that overlap by one token, padding removed."""
    stream = list(blocks[0])
    for block in blocks[1:]:
        assert block[0] == stream[-1], "consecutive blocks must share one token"
        stream.extend(block[1:])
    return [token for token in stream if token != PAD_TOKEN]


def test_packing_puts_eos_between_documents_and_loses_no_token():
    documents = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11, 12, 13, 14, 15, 16]]
    blocks = pack_documents(documents, EOS, block_size=5)
    assert all(len(block) == 5 for block in blocks)
    assert unpack(blocks) == [EOS, 1, 2, 3, EOS, 4, 5, 6, 7, 8, EOS, 9, EOS, 10, 11, 12, 13, 14, 15, 16]
    assert blocks[-1][-1] == PAD_TOKEN  # the short tail is padded, not dropped
    # Every token after the first is a target exactly once.
    targets = [token for block in blocks for token in block[1:] if token != PAD_TOKEN]
    assert targets == unpack(blocks)[1:]


def test_tokenize_and_pack_with_dataset_map(tokenizer):
    texts = ["The cat sat on the mat.", "A second, longer document about dogs and rivers.", "Third."]
    packed = tokenize_and_pack(datasets.Dataset.from_dict({"text": texts}), tokenizer, block_size=9)
    expected = []
    for text in texts:
        expected += [EOS] + tokenizer(text)["input_ids"]
    assert unpack(packed["input_ids"]) == expected
    assert packed.column_names == ["input_ids"]


def test_collate_makes_inputs_and_shifted_targets():
    batch = collate_blocks([{"input_ids": [EOS, 5, 6, 7]}, {"input_ids": [8, 9, PAD_TOKEN, PAD_TOKEN]}])
    assert batch["input_ids"].tolist() == [[EOS, 5, 6], [8, 9, EOS]]
    assert batch["targets"].tolist() == [[5, 6, 7], [9, -100, -100]]
    assert batch["input_ids"].dtype == torch.long


def test_embedded_corpus_is_wikipedia_sample_plus_lee_split_by_document():
    documents = embedded_documents()
    wiki = [doc for doc in documents if doc["source"].startswith("wikipedia:")]
    lee = [doc for doc in documents if doc["source"].startswith("lee:")]
    assert len(wiki) == 106 and len(lee) == 300
    assert 2_500_000 < sum(len(doc["text"]) for doc in wiki) < 3_500_000
    assert not any("'''" in doc["text"] or "[[" in doc["text"] for doc in wiki)  # markup gone
    assert any(doc["source"] == "wikipedia:Anarchism" for doc in wiki)

    split = load_documents(DataArguments(validation_fraction=0.1))
    train_sources, validation_sources = set(split["train"]["source"]), set(split["validation"]["source"])
    assert not train_sources & validation_sources
    assert len(train_sources) + len(validation_sources) == len(documents)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".parquet"])
def test_local_files_are_packed_and_cached(tmp_path, tokenizer, suffix, monkeypatch):
    texts = [f"Document number {i} talks about topic {i % 7} at some length." for i in range(40)]
    path = tmp_path / f"corpus{suffix}"
    if suffix == ".txt":
        path.write_text("\n\n".join(texts))  # one document per paragraph
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps({"text": text}) for text in texts))
    else:
        datasets.Dataset.from_dict({"text": texts}).to_parquet(str(path))
    args = DataArguments(data_files=[str(path)], data_cache_dir=str(tmp_path / "cache"), validation_fraction=0.1)
    packed = prepare_datasets(args, tokenizer, block_size=17)
    assert set(packed) == {"train", "validation"}
    tokens = sum(len([t for t in block if t != PAD_TOKEN]) for block in packed["train"]["input_ids"])
    tokens += sum(len([t for t in block if t != PAD_TOKEN]) for block in packed["validation"]["input_ids"])
    overlaps = len(packed["train"]) - 1 + len(packed["validation"]) - 1
    assert tokens - overlaps == sum(len(tokenizer(t)["input_ids"]) + 1 for t in texts)  # + 1 EOS per document

    # A second call reads the cache: the source is never opened again.
    monkeypatch.setattr(train_data, "load_documents", lambda *_: pytest.fail("cache was not used"))
    again = prepare_datasets(args, tokenizer, block_size=17)
    assert again["train"]["input_ids"] == packed["train"]["input_ids"]


def test_missing_or_bad_data_is_a_clear_error(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="data file not found: .*nowhere.txt"):
        prepare_datasets(DataArguments(data_files=[str(tmp_path / "nowhere.txt")]), tokenizer, block_size=9)
    bad = tmp_path / "corpus.docx"
    bad.write_text("x")
    with pytest.raises(ValueError, match="unsupported data file type"):
        load_documents(DataArguments(data_files=[str(bad)]))
    with pytest.raises(ValueError, match="either --dataset or --data_files"):
        load_documents(DataArguments(dataset="openwebtext", data_files=[str(bad)]))
    table = tmp_path / "corpus.jsonl"
    table.write_text(json.dumps({"body": "some text"}) + "\n")
    with pytest.raises(ValueError, match="no column 'text'.*body"):
        load_documents(DataArguments(data_files=[str(table)]))


def test_configs_follow_the_paper_and_the_command_line_wins():
    sizes = {"micro": (384, 6, 6), "mini": (640, 8, 8), "small": (768, 12, 12)}
    for name, shape in sizes.items():
        _, args = parse_args((DataArguments, TrainArguments), ["--config", name])
        assert (args.n_embd, args.n_layer, args.n_head) == shape
        assert (args.num_senses, args.n_positions, args.vocab_size) == (16, 512, 50264)
        assert (args.learning_rate, args.warmup_steps, args.max_steps, args.tokens_per_step) == (
            6e-4, 5000, 100_000, 524_288)
        assert args.lr_scheduler == "linear"
    _, small = parse_args((DataArguments, TrainArguments), ["--config", "small"])
    assert gradient_accumulation_steps(small, num_processes=4) * 4 * small.batch_size * 512 == 524_288

    data_args, args = parse_args((DataArguments, TrainArguments),
                                 ["--config", "nano", "--learning_rate", "1e-3", "--model", "gpt2",
                                  "--data_files", "a.txt", "b.txt"])
    assert args.learning_rate == 1e-3 and args.model == "gpt2" and args.n_embd == 128
    assert data_args.data_files == ["a.txt", "b.txt"]


def test_config_errors_name_the_problem(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("n_embd: 64\nlearning_rte: 0.1\n")
    with pytest.raises(ValueError, match="unknown key.*learning_rte"):
        parse_args((DataArguments, TrainArguments), ["--config", str(config)])
    with pytest.raises(FileNotFoundError, match="config file not found"):
        parse_args((DataArguments, TrainArguments), ["--config", "huge"])
    with pytest.raises(ValueError, match="divisible by num_senses"):
        parse_args((DataArguments, TrainArguments), ["--n_embd", "100"])


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [("empty.txt", b"", "data file is empty"),
     ("blank.jsonl", b"  \n\n\t\n", "holds only whitespace"),
     ("latin1.txt", "Ein Café in Zürich.".encode("latin-1"), r"not UTF-8 text \(byte b'\\xe9' at offset 7;"),
     ("cut.txt", "naïve".encode()[:3], "ends inside a character"),
     ("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary, not text"),
     ("utf16.txt", "text".encode("utf-16"), "binary, not text.*UTF-16"),
     ("table.parquet", b"not a parquet file at all", "not a Parquet file")],
)
def test_unreadable_data_files_are_named(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    args = DataArguments(data_files=[str(path)], data_cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=f"{message}.*: {path}$"):
        check_data_source(args)  # before anything is built: from the file's first MiB
    with pytest.raises(ValueError, match=f"{message}.*: {path}$"):
        load_documents(args)  # and in full, before datasets reads it


def test_a_bad_byte_past_the_first_mib_is_found_before_tokenising(tmp_path, tokenizer):
    path = tmp_path / "long.txt"
    content = b"word " * 300_000 + "\n\nfin de l'\xe9t\xe9".encode("latin-1")  # 1.5 MB, Latin-1 at the end
    path.write_bytes(content)
    args = DataArguments(data_files=[str(path)], data_cache_dir=str(tmp_path / "cache"))
    check_data_source(args)  # the first MiB is fine
    offset = content.index("é".encode("latin-1"))
    with pytest.raises(ValueError, match=f"not UTF-8 text .* at offset {offset:,};.*{path}"):
        prepare_datasets(args, tokenizer, block_size=9)


def test_malformed_json_lines_name_the_file(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=f"{path}:2: not a JSON object"):  # before datasets reads it
        load_documents(DataArguments(data_files=[str(path)]))


def test_a_data_file_rewritten_in_place_with_the_same_size_and_time_is_tokenised_again(tmp_path, tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"The river bank number {i} floods in spring." for i in range(30)))
    stat = path.stat()
    args = DataArguments(data_files=[str(path)], data_cache_dir=str(tmp_path / "cache"), validation_fraction=0.1)
    before = prepare_datasets(args, tokenizer, block_size=17)
    path.write_text(path.read_text().replace("river", "money"))  # same length: " river" and " money" are 5 letters
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same modification time
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    after = prepare_datasets(args, tokenizer, block_size=17)
    money = tokenizer.encode(" money")[0]
    assert any(money in block for block in after["train"]["input_ids"])  # the new text, not the stale tokens
    assert not any(money in block for block in before["train"]["input_ids"])
