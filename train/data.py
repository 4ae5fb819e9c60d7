"""Training data: documents from the Hub, local files or the embedded offline corpus, tokenised and packed.

Every source becomes a ``DatasetDict`` with ``train`` and ``validation`` splits of documents (one text column).
``Dataset.map`` then tokenises them with the GPT-2 tokenizer and packs them into blocks of ``n_positions + 1``
tokens: each document is preceded by EOS (so EOS separates documents and every document token is a target),
and consecutive blocks overlap by one token, so block ``i`` is ``stream[i*n : i*n + n + 1]`` and every token of
the stream after the first is predicted exactly once. The last, shorter block of each map batch is padded with
``PAD_TOKEN`` (-100), which the collator turns into ignored targets: no token is dropped. The packed splits are
saved to disk under a key of everything that produced them, so a second run loads them at once.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile

import datasets
import torch
from torch.utils.data import DataLoader

from backpack.corpora import LEE_SAMPLE, WIKI_SAMPLE, gensim_test_file, lee_documents, wikipedia_articles
from backpack.files import file_sha256
from backpack_train.config import DataArguments, InputError
from configuration_backpack_gpt2 import GPT2_END_OF_TEXT

logger = logging.getLogger(__name__)

PAD_TOKEN = -100  # fills the end of a map batch's last block; becomes an ignored target
FORMAT_VERSION = 1  # bump when packing changes, so stale caches are not reused
FILE_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


# --- sources ---------------------------------------------------------------------------------------------------


def embedded_documents() -> list[dict]:
    """The offline default corpus: gensim's Wikipedia sample articles and the Lee news corpus (backpack.corpora)."""
    documents = [{"text": text, "source": f"wikipedia:{title}"} for title, text in wikipedia_articles()]
    documents += [{"text": text, "source": f"lee:{number}"} for number, text in enumerate(lee_documents())]
    return documents


class DataError(InputError, ValueError):
    """A data source that holds nothing to train on, or can't be read as its format; the message names the file."""


class DataFileNotFound(InputError, FileNotFoundError):
    """A ``--data_files`` path or glob that matches no file."""


def resolve_data_files(patterns: list[str]) -> list[str]:
    """Expand globs and check every file exists and has a supported extension, naming any that does not."""
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            what = "no file matches the pattern" if glob.has_magic(pattern) else "no such file"
            raise DataFileNotFound(f"data file not found: {pattern} ({what})")
        for path in matches:
            if os.path.isdir(path):
                raise DataError(f"data file {path} is a folder; give the files in it (e.g. "
                                f"{os.path.join(path, '*.txt')})")
        files.extend(matches)
    builders = {FILE_BUILDERS.get(os.path.splitext(path)[1].lower()) for path in files}
    if None in builders:
        bad = [path for path in files if os.path.splitext(path)[1].lower() not in FILE_BUILDERS]
        raise DataError(f"unsupported data file type: {bad[0]} (use {', '.join(sorted(FILE_BUILDERS))})")
    if len(builders) > 1:
        raise DataError(f"data files mix formats ({', '.join(sorted(builders))}); pass one kind at a time")
    return files


JSON_CHECK_BYTES = 1 << 20  # the records of a JSON file checked before datasets reads it (its first MiB)


def check_data_file(path: str, max_bytes: int | None = None, text_column: str = "text") -> None:
    """Refuse a data file that holds no text: empty, binary, not UTF-8, records without a text string, not Parquet.

    ``datasets`` would otherwise fail deep inside its builders (``SchemaInferenceError``, ``UnicodeDecodeError``,
    ``ArrowInvalid``) without naming the file. Text formats are read in full (``max_bytes``: only their
    beginning); the records of a JSON / JSON-lines file are checked in its first MiB (a ``text_column`` that is
    not a string, a line that is not a JSON object), a Parquet file's schema from its footer.

    Raises:
        DataError: naming the file (and the line, for JSON records).
    """
    try:
        size = os.path.getsize(path)
    except OSError as error:
        raise DataError(f"can't read data file {path}: {error.strerror or error}") from error
    if size == 0:
        raise DataError(f"data file is empty: {path}")
    builder = FILE_BUILDERS[os.path.splitext(path)[1].lower()]
    if builder == "parquet":
        _check_parquet(path, size, text_column)
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, has_text, head = 0, False, []
    with open(path, "rb") as handle:
        while chunk := handle.read(min(1 << 20, max_bytes - offset) if max_bytes is not None else 1 << 20):
            if (zero := chunk.find(b"\x00")) >= 0:
                raise DataError(f"data file is binary, not text (a NUL byte at offset {offset + zero:,}; UTF-16 "
                                f"text has them too: convert it to UTF-8): {path}")
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as error:
                raise DataError(
                    f"data file is not UTF-8 text (byte {chunk[error.start:error.start + 1]!r} at offset "
                    f"{offset + error.start:,}; e.g. `iconv -f latin1 -t utf-8` converts Latin-1): {path}"
                ) from None
            has_text = has_text or bool(text.strip())
            if builder == "json" and offset < JSON_CHECK_BYTES:
                head.append(text)
            offset += len(chunk)
            if max_bytes is not None and offset >= max_bytes:
                break
    if max_bytes is None or offset < max_bytes:  # read to its end
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(f"data file is not UTF-8 text (it ends inside a character): {path}") from None
    if not has_text and (max_bytes is None or offset < max_bytes):
        raise DataError(f"data file holds only whitespace, no text: {path}")
    if builder == "json":
        _check_json_records(path, "".join(head), complete=offset <= JSON_CHECK_BYTES and offset == size,
                            text_column=text_column)


def _kind(value) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__)


def _check_json_records(path: str, text: str, complete: bool, text_column: str) -> None:
    """The records at the start of a JSON-lines file (or a whole JSON array) hold ``text_column`` as strings."""
    if text.lstrip().startswith("["):  # one JSON array of records
        if not complete:
            return  # too large to parse here; datasets reads it
        try:
            records = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: not valid JSON ({error.msg}, column {error.colno})") from None
        where = "record"
    else:  # JSON lines: one object per line (the last line of an incomplete head may be cut: skipped)
        lines = text.splitlines()[: None if complete else -1]
        records = []
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    records.append((number, json.loads(line)))
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number}: not a JSON object ({error.msg}, column {error.colno}); "
                                    "expected one JSON object per line") from None
        where = "line"
    fields: set[str] = set()
    for number, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{path}: {where} {number} is {_kind(record)}, not a JSON object with a "
                            f"{text_column!r} field")
        fields.update(record)
        value = record.get(text_column)
        if value is not None and not isinstance(value, str):
            raise DataError(f"{path}: {where} {number}: {text_column!r} is {json.dumps(value)[:40]} "
                            f"({_kind(value)}); expected a string of text")
    if records and text_column not in fields:
        raise DataError(f"no column {text_column!r} in the records of {path} (their fields: "
                        f"{', '.join(sorted(fields))}); set --text_column")


def _check_parquet(path: str, size: int, text_column: str) -> None:
    """A Parquet file whose footer reads and whose schema has ``text_column`` as strings."""
    with open(path, "rb") as handle:
        head = handle.read(4)
        handle.seek(max(size - 4, 0))
        tail = handle.read(4)
    if size < 12 or head != b"PAR1" or tail != b"PAR1":
        raise DataError(f"data file is not a Parquet file (no PAR1 marks at its start and end): {path}")
    import pyarrow
    import pyarrow.parquet

    try:
        schema = pyarrow.parquet.ParquetFile(path).schema_arrow
    except (pyarrow.ArrowException, OSError) as error:
        raise DataError(f"data file is not a readable Parquet file ({error}): {path}") from None
    if text_column not in schema.names:
        raise DataError(f"no column {text_column!r} in {path} (columns: {', '.join(schema.names)}); set --text_column")
    column = schema.field(text_column).type
    if not (pyarrow.types.is_string(column) or pyarrow.types.is_large_string(column)):
        raise DataError(f"{path}: the {text_column!r} column holds {column}, not strings of text")


def check_data_source(args: DataArguments) -> None:
    """Fail early, before any model is built, when the requested data cannot exist.

    Local files are checked for content too, from their first MiB (:func:`load_documents` reads all of them
    before tokenising).
    """
    if args.dataset and args.data_files:
        raise DataError("pass either --dataset or --data_files, not both")
    if args.data_files:
        for path in resolve_data_files(args.data_files):
            check_data_file(path, max_bytes=1 << 20, text_column=args.text_column)
    elif args.dataset is None:
        for name in (WIKI_SAMPLE, LEE_SAMPLE):
            gensim_test_file(name)


def load_documents(args: DataArguments, cache_dir: str | None = None
                   ) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """The documents of the requested source, as ``train`` and ``validation`` splits with a ``text`` column.

    Args:
        cache_dir: Where ``datasets`` keeps what it reads from local ``--data_files`` (default: its own cache).
    """
    check_data_source(args)
    if args.data_files:
        files = resolve_data_files(args.data_files)
        for path in files:
            check_data_file(path, text_column=args.text_column)
        builder = FILE_BUILDERS[os.path.splitext(files[0])[1].lower()]
        extra = {"sample_by": args.text_sample_by} if builder == "text" else {}
        try:
            raw = datasets.load_dataset(builder, data_files={"train": files}, streaming=args.streaming,
                                        cache_dir=cache_dir, **extra)
        except datasets.exceptions.DatasetGenerationError as error:
            cause = error.__cause__ or error
            raise DataError(f"could not read {' '.join(files) if len(files) < 4 else f'{len(files)} data files'} "
                            f"as {builder}: {type(cause).__name__}: {cause}") from error
    elif args.dataset:
        raw = _load_hub_dataset(args)
    else:
        raw = datasets.DatasetDict({"train": datasets.Dataset.from_list(embedded_documents())})
    if "train" not in raw:
        raise DataError(f"dataset {args.dataset} has no train split (splits: {', '.join(raw)})")
    if args.text_column not in (raw["train"].column_names or [args.text_column]):
        raise DataError(
            f"no column '{args.text_column}' in the data (columns: {', '.join(raw['train'].column_names)}); "
            "set --text_column"
        )
    return _split(raw, args)


def _load_hub_dataset(args: DataArguments) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """``load_dataset`` (or ``load_from_disk`` for a saved folder), turning its failures into one clear error."""
    if os.path.isdir(args.dataset) and os.path.exists(os.path.join(args.dataset, "dataset_dict.json")):
        return datasets.load_from_disk(args.dataset)
    try:
        return datasets.load_dataset(args.dataset, args.dataset_config, streaming=args.streaming)
    except Exception as error:  # DatasetNotFoundError, ConnectionError, FileNotFoundError, ... all mean the same
        raise DataFileNotFound(
            f"could not load dataset '{args.dataset}' (config {args.dataset_config}): {error}. Check the name, "
            "your connection to the Hub, or use --data_files for local files."
        ) from error


def _split(raw, args: DataArguments):
    """Keep the source's validation split, or hold out documents (by document, never inside one)."""
    train = raw["train"]
    streaming = isinstance(train, datasets.IterableDataset)
    if "validation" in raw:
        validation = raw["validation"]
    elif streaming:
        validation, train = train.take(args.validation_documents), train.skip(args.validation_documents)
    else:
        parts = train.train_test_split(test_size=args.validation_fraction, seed=args.data_seed)
        train, validation = parts["train"], parts["test"]
    if args.max_documents is not None:
        train = train.take(args.max_documents if streaming else min(args.max_documents, len(train)))
    if streaming:
        return datasets.IterableDatasetDict({"train": train, "validation": validation})
    return datasets.DatasetDict({"train": train, "validation": validation})


# --- tokenising and packing ------------------------------------------------------------------------------------


def pack_documents(token_lists: list[list[int]], eos_token_id: int, block_size: int) -> list[list[int]]:
    """Join documents as ``EOS doc EOS doc ...`` and cut the stream into blocks of ``block_size`` tokens.

    Consecutive blocks overlap by one token (the last input of one block is the first of the next), so every
    token after the first is a target exactly once; the last block is padded with ``PAD_TOKEN``.
    """
    stream = []
    for tokens in token_lists:
        stream.append(eos_token_id)
        stream.extend(tokens)
    stride = block_size - 1
    blocks = []
    for start in range(0, max(len(stream) - 1, 0), stride):
        block = stream[start : start + block_size]
        blocks.append(block + [PAD_TOKEN] * (block_size - len(block)))
    return blocks


def _tokenize_and_pack(batch: dict, tokenizer, text_column: str, block_size: int) -> dict:
    """``Dataset.map`` function: a batch of documents -> a batch of packed blocks."""
    token_lists = tokenizer(batch[text_column], add_special_tokens=False, verbose=False)["input_ids"]
    return {"input_ids": pack_documents(token_lists, tokenizer.eos_token_id, block_size)}


def tokenize_and_pack(
    documents: datasets.Dataset | datasets.IterableDataset,
    tokenizer,
    block_size: int,
    text_column: str = "text",
    num_proc: int | None = None,
):
    """Tokenise and pack one split with ``Dataset.map``; the result has one ``input_ids`` column."""
    documents = documents.select_columns([text_column])  # a stream may not know its other columns up front
    kwargs = {"fn_kwargs": {"tokenizer": tokenizer, "text_column": text_column, "block_size": block_size},
              "batched": True, "remove_columns": [text_column]}
    if isinstance(documents, datasets.Dataset):
        # At most one worker per 1,000 documents: on small data, starting processes costs more than it saves.
        workers = min(num_proc or os.cpu_count() or 1, max(1, len(documents) // 1000))
        kwargs.update(num_proc=workers if workers > 1 else None,
                      desc=f"Tokenising and packing into blocks of {block_size}")
    return documents.map(_tokenize_and_pack, **kwargs)


def _cache_key(args: DataArguments, tokenizer, block_size: int) -> str:
    """Hash of everything that determines the packed splits; local files by path and SHA-256 of their content.

    The content, not the size and modification time: a file rewritten in place with the same size within the
    file system's time resolution (or with its mtime restored) would otherwise be trained on as its stale tokens.
    Hashing reads the files once per run (about 1 GB/s), far less than tokenising them.
    """
    if args.data_files:
        source = [(path, file_sha256(path)) for path in resolve_data_files(args.data_files)]
    elif args.dataset:
        source = [args.dataset, args.dataset_config]
    else:
        source = ["embedded", WIKI_SAMPLE, LEE_SAMPLE, os.path.getsize(gensim_test_file(WIKI_SAMPLE))]
    spec = {"source": source, "text_column": args.text_column, "sample_by": args.text_sample_by,
            "validation_fraction": args.validation_fraction, "max_documents": args.max_documents,
            "data_seed": args.data_seed, "block_size": block_size, "vocab": len(tokenizer),
            "eos": tokenizer.eos_token_id, "format": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_datasets(args: DataArguments, tokenizer, block_size: int):
    """Packed ``train`` / ``validation`` splits: loaded from the disk cache, or built and saved there.

    Streamed sources are packed on the fly (the validation split is materialised, it is small) and not cached.
    Under several processes call this inside ``accelerator.main_process_first()`` so only one builds the cache.
    """
    check_data_source(args)
    if args.streaming:
        documents = load_documents(args)
        train = tokenize_and_pack(documents["train"], tokenizer, block_size, args.text_column)
        blocks = tokenize_and_pack(documents["validation"], tokenizer, block_size, args.text_column)
        validation = datasets.Dataset.from_list(list(blocks))
        return datasets.IterableDatasetDict({"train": train, "validation": validation})
    cache = os.path.join(os.path.expanduser(args.data_cache_dir), _cache_key(args, tokenizer, block_size))
    if os.path.exists(os.path.join(cache, "dataset_dict.json")):
        logger.info("Loading packed data from %s", cache)
        return datasets.load_from_disk(cache)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    # Local files are read into a scratch cache of their own: datasets keys its cache of a local file by its
    # modification time only, so a file rewritten in place would come back as its old content.
    with tempfile.TemporaryDirectory(prefix=".reading-", dir=os.path.dirname(cache)) as scratch:
        documents = load_documents(args, cache_dir=scratch if args.data_files else None)
        packed = datasets.DatasetDict(
            {split: tokenize_and_pack(docs, tokenizer, block_size, args.text_column, args.num_proc)
             for split, docs in documents.items() if split in ("train", "validation")}
        )
        for split, blocks in packed.items():
            if len(blocks) == 0:
                raise DataError(f"the {split} split holds no text to train on (column '{args.text_column}')")
        # Write beside the final path and rename, so an interrupted run never leaves a half-written cache.
        partial = f"{cache}.partial-{os.getpid()}"
        packed.save_to_disk(partial)
    try:
        os.replace(partial, cache)
    except OSError:  # another run finished the same cache first: keep theirs
        if not os.path.exists(os.path.join(cache, "dataset_dict.json")):
            raise
        shutil.rmtree(partial, ignore_errors=True)
    return datasets.load_from_disk(cache)


# --- batches ---------------------------------------------------------------------------------------------------


def collate_blocks(examples: list[dict], eos_token_id: int = GPT2_END_OF_TEXT) -> dict[str, torch.Tensor]:
    """Stack blocks of ``n + 1`` tokens into inputs ``block[:-1]`` and targets ``block[1:]`` (padding -> -100)."""
    blocks = torch.tensor([example["input_ids"] for example in examples], dtype=torch.long)
    inputs = blocks[:, :-1].masked_fill(blocks[:, :-1] == PAD_TOKEN, eos_token_id)
    return {"input_ids": inputs, "targets": blocks[:, 1:].clone()}


def make_validation_loader(packed, batch_size: int) -> DataLoader:
    """Validation batches in order (training batches follow the run's data order: train/data_order.py).

    The loader has its own generator, so that starting to iterate it never draws from the global RNG: a resumed
    run then sees the same dropout masks as an uninterrupted one.
    """
    return DataLoader(packed["validation"], batch_size=batch_size, shuffle=False, collate_fn=collate_blocks,
                      generator=torch.Generator().manual_seed(0))
