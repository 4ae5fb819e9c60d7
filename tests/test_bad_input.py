"""Every bad input is refused in one line that names it, with exit status 2 and no traceback, as a user meets it.

Each case is one command line (``train/pretrain.py``, ``train/evaluate.py``, ``hub_upload.py``, the ``backpack``
command) run in a process of its own, forked from a server that has already imported those modules
(multiprocessing's forkserver): the exit status and the output are the command's own, and a case costs its checks,
not a 7-second import. A few cases also run through the real executables, to check that the same line and status
reach a shell. The trainer's cases must fail before any model is built: their output folder is never created.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, save_tiny_folder
from safetensors.torch import load_file, save_file

# command -> (module, function(argv) -> exit status); the command lines' own entry points.
COMMANDS = {"pretrain": ("backpack_train.pretrain", "cli"), "evaluate": ("backpack_train.evaluate", "cli"),
            "hub_upload": ("hub_upload", "main"), "backpack": ("backpack.cli", "main")}
# A tiny run on a few lines of text: what reaches the model is valid; each case breaks one thing.
TRAIN = ["--config", "nano", "--n_embd", "32", "--n_layer", "1", "--n_head", "2", "--num_senses", "4",
         "--n_positions", "16", "--batch_size", "2", "--tokens_per_step", "32", "--report_to", "none"]
WEIGHT = "backpack.gpt2_model.h.0.attn.c_proj.weight"


def _run_command(command: str, argv: list[str], env: dict[str, str], out_path: str, err_path: str) -> None:
    """Body of one forked run: the command's entry point with ``argv`` and ``env``, stdout and stderr to files."""
    import importlib

    for descriptor, path in ((1, out_path), (2, err_path)):
        with open(path, "w") as handle:
            os.dup2(handle.fileno(), descriptor)
    os.environ.update(env)
    module, function = COMMANDS[command]
    sys.exit(getattr(importlib.import_module(module), function)(argv))


class Commands:
    """``commands(command, argv) -> (exit status, stdout, stderr)``, each run a process forked from a warm server."""

    def __init__(self, logs: Path):
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload([module for module, _ in COMMANDS.values()])
        self.logs = logs
        self.runs = 0

    def __call__(self, command: str, argv: list[str], env: dict[str, str] | None = None,
                 timeout: float = 300) -> tuple[int, str, str]:
        out, err = self.logs / f"{self.runs}.out", self.logs / f"{self.runs}.err"
        self.runs += 1
        env = {"BACKPACK_FAULT": "", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        process = self.context.Process(target=_run_command, args=(command, argv, env, str(out), str(err)))
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            raise AssertionError(f"{command} {' '.join(argv)} did not finish in {timeout:.0f}s")
        return process.exitcode, out.read_text(), err.read_text()


@pytest.fixture(scope="module")
def commands(tmp_path_factory) -> Commands:
    return Commands(tmp_path_factory.mktemp("logs"))


def _write_data_files(folder: Path) -> None:
    folder.mkdir()
    (folder / "empty.txt").write_bytes(b"")
    (folder / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 20)
    (folder / "latin1.txt").write_bytes("Ein Café in Zürich.\n".encode("latin-1"))
    (folder / "utf16.txt").write_bytes("Some text.\n".encode("utf-16"))
    (folder / "blank.txt").write_bytes(b"  \n\n\t\n")
    (folder / "a-folder.txt").mkdir()
    (folder / "broken.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (folder / "number.jsonl").write_text('{"text": "fine"}\n{"text": 5}\n')
    (folder / "fake.parquet").write_bytes(b"PAR1" + b"not really a parquet file" + b"PAR1")
    (folder / "good.txt").write_text("\n\n".join(f"Paragraph {i} of a small text about rivers and banks."
                                                 for i in range(60)))


def _write_configs(folder: Path) -> None:
    folder.mkdir()
    configs = {"float.yaml": "batch_size: 1.5\n", "list.yaml": "learning_rate: [0.1, 0.2]\n",
               "unknown.yaml": "n_embd: 64\nlearning_rte: 0.1\n", "zero.yaml": "max_steps: 0\n",
               "negative.yaml": "warmup_steps: -5\n", "string.yaml": "n_layer: four\n",
               "syntax.yaml": "n_layer: [4\n", "scalar.yaml": "just a sentence\n"}
    for name, text in configs.items():
        (folder / name).write_text(text)


def _broken_model(good: Path, folder: Path, *, weights=None, config=None, cut=None) -> None:
    """A copy of `good` with one thing broken: a weight (in place), a config change, or the file cut short."""
    shutil.copytree(good, folder)
    path = folder / "model.safetensors"
    if weights is not None:
        state = load_file(path)
        weights(state)
        save_file(state, path, metadata={"format": "pt"})
    if config is not None:
        values = json.loads((folder / "config.json").read_text())
        values.update(config)
        (folder / "config.json").write_text(json.dumps(values))
    if cut is not None:
        path.write_bytes(path.read_bytes()[:cut(path.stat().st_size)])


def _set(dtype=None, value=None):
    def edit(state):
        if dtype is torch.bool:
            state[WEIGHT] = state[WEIGHT] > 0
        elif dtype is not None:
            state[WEIGHT] = state[WEIGHT].to(dtype)
        else:
            state[WEIGHT][0, 1] = value
    return edit


BROKEN_MODELS = {
    "int64": dict(weights=_set(torch.int64)), "bool": dict(weights=_set(torch.bool)),
    "nan": dict(weights=_set(value=float("nan"))), "inf": dict(weights=_set(value=float("-inf"))),
    "truncated": dict(cut=lambda size: size - 1000), "cut-header": dict(cut=lambda size: 20),
    "huge-n-layer": dict(config={"n_layer": 100_000_000}), "float-vocab": dict(config={"vocab_size": 1e9}),
    "wide": dict(config={"n_embd": 2**20, "n_head": 2}), "negative-positions": dict(config={"n_positions": -5}),
    "string-layers": dict(config={"n_layer": "12"}),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Data files, config files and model folders, each broken in one way (and a good one of each)."""
    root = tmp_path_factory.mktemp("inputs")
    _write_data_files(root / "data")
    _write_configs(root / "configs")
    good = Path(save_tiny_folder(root / "model"))
    for name, breakage in BROKEN_MODELS.items():
        _broken_model(good, root / f"model-{name}", **breakage)
    (root / "a-file").write_text("not a folder")
    (root / "ratings").mkdir()
    return root


# (command, argv with {root} for the inputs folder, what the one line must say)
CASES = [
    # the trainer's data files: refused before any model is built
    ("pretrain", ["--data_files", "{root}/data/empty.txt"], "data file is empty: {root}/data/empty.txt"),
    ("pretrain", ["--data_files", "{root}/data/binary.txt"], "data file is binary, not text"),
    ("pretrain", ["--data_files", "{root}/data/latin1.txt"], "not UTF-8 text (byte b'\\xe9' at offset 7"),
    ("pretrain", ["--data_files", "{root}/data/utf16.txt"], "UTF-16 text has them too: convert it to UTF-8"),
    ("pretrain", ["--data_files", "{root}/data/blank.txt"], "holds only whitespace, no text: {root}/data/blank.txt"),
    ("pretrain", ["--data_files", "{root}/data/a-folder.txt"], "data file {root}/data/a-folder.txt is a folder"),
    ("pretrain", ["--data_files", "{root}/data/nothing-*.txt"], "data file not found: {root}/data/nothing-*.txt "
                                                                "(no file matches the pattern)"),
    ("pretrain", ["--data_files", "{root}/data/broken.jsonl"], "{root}/data/broken.jsonl:2: not a JSON object"),
    ("pretrain", ["--data_files", "{root}/data/number.jsonl"], "{root}/data/number.jsonl: line 2: 'text' is 5 "
                                                               "(a number); expected a string"),
    ("pretrain", ["--data_files", "{root}/data/fake.parquet"], "not a readable Parquet file"),
    # the trainer's config files and flags: types, ranges, unknown keys, work bounds
    ("pretrain", ["--config", "{root}/configs/float.yaml"], "float.yaml: batch_size must be an integer, got 1.5"),
    ("pretrain", ["--config", "{root}/configs/list.yaml"], "learning_rate must be a number, got [0.1, 0.2] (a list)"),
    ("pretrain", ["--config", "{root}/configs/unknown.yaml"], "unknown key(s) in {root}/configs/unknown.yaml: "
                                                              "learning_rte"),
    ("pretrain", ["--config", "{root}/configs/zero.yaml"], "zero.yaml: max_steps must be >= 1, got 0"),
    ("pretrain", ["--config", "{root}/configs/negative.yaml"], "negative.yaml: warmup_steps must be >= 0, got -5"),
    ("pretrain", ["--config", "{root}/configs/string.yaml"], "n_layer must be an integer or null, got 'four'"),
    ("pretrain", ["--config", "{root}/configs/syntax.yaml"], "syntax.yaml is not valid YAML (line 2"),
    ("pretrain", ["--config", "{root}/configs/scalar.yaml"], "must hold a mapping of keys to values, not a str"),
    ("pretrain", ["--config", "{root}/configs/missing.yaml"], "config file not found: {root}/configs/missing.yaml"),
    ("pretrain", [*TRAIN, "--batch_size", "1.5"], "argument --batch_size/--batch-size: invalid int value: '1.5'"),
    ("pretrain", [*TRAIN, "--learning_rate", "nan"], "learning_rate must be a finite number > 0, got nan"),
    ("pretrain", [*TRAIN, "--dropout", "1.5"], "dropout must be a finite number >= 0 and < 1, got 1.5"),
    ("pretrain", [*TRAIN, "--tokens_per_step", "1000000000000000"], "micro-batches of 32 tokens (batch_size 2 x "
                                                                    "n_positions 16 x 1 process(es)) per optimizer "
                                                                    "step; at most 65,536"),
    # evaluation flags, checked before the model or data are loaded
    ("evaluate", ["--model_path", "{root}/model", "--max_batches", "-1"], "--max_batches must be an integer >= 0"),
    ("evaluate", ["--model_path", "{root}/model", "--block_size", "-5"], "--block_size must be an integer >= 1, "
                                                                         "got -5"),
    # publishing
    ("hub_upload", ["{root}/model", "--repo-id", "me/x", "--max-shard-size", "abc"], "argument --max-shard-size: "
                                                                                    "expected a size such as 2GB"),
    ("hub_upload", ["{root}/model", "--repo-id", "me/x", "--dry-run", "--staging-dir", "{root}/a-file"],
     "--staging-dir {root}/a-file is a file; expected an empty or missing folder"),
    # the toolkit: devices, files, work bounds
    ("backpack", ["senses", "{root}/model", "bank", "--device", "banana"], "argument --device: expected a torch "
                                                                           "device such as cpu"),
    ("backpack", ["senses", "{root}/model", "bank", "--device", "cuda:99"], "argument --device: 'cuda:99': this "
                                                                            "machine has"),
    ("backpack", ["similarity", "{root}/model", "--rg65", "{root}/ratings"], "similarity file '{root}/ratings' is a "
                                                                             "folder; expected a ratings file"),
    ("backpack", ["bias", "{root}/model", "--scales", "0:1e9:1e-9"], "makes 1,000,000,000,000,000,001 scales; at "
                                                                     "most 100,000"),
    # broken checkpoints, refused by the loader before they are used
    ("backpack", ["senses", "{root}/model-int64", "bank"], "{root}/model-int64/model.safetensors: tensor " + WEIGHT
                                                           + " is stored as I64; weights must be floating point"),
    ("backpack", ["senses", "{root}/model-bool", "bank"], "tensor " + WEIGHT + " is stored as BOOL"),
    ("backpack", ["senses", "{root}/model-nan", "bank"], "{root}/model-nan/model.safetensors: weight " + WEIGHT
                                                         + " holds 1 NaN value(s)"),
    ("backpack", ["senses", "{root}/model-inf", "bank"], "weight " + WEIGHT + " holds 1 infinite value(s)"),
    ("backpack", ["senses", "{root}/model-truncated", "bank"], "can't read the weights file "
                                                               "{root}/model-truncated/model.safetensors (truncated"),
    ("backpack", ["senses", "{root}/model-cut-header", "bank"], "model-cut-header/model.safetensors (truncated or "
                                                                "not a safetensors file)"),
    ("backpack", ["senses", "{root}/model-huge-n-layer", "bank"], "n_layer 100000000"),
    ("backpack", ["senses", "{root}/model-float-vocab", "bank"], "model-float-vocab/config.json: vocab_size must be "
                                                                 "a positive integer, got 1000000000.0 (a float)"),
    ("backpack", ["senses", "{root}/model-wide", "bank"], "of memory available on this machine"),
    ("backpack", ["senses", "{root}/model-negative-positions", "bank"], "n_positions must be a positive integer, "
                                                                        "got -5"),
    ("backpack", ["senses", "{root}/model-string-layers", "bank"], "n_layer must be a positive integer, got \"12\" "
                                                                   "(a string)"),
]


def _expand(text: str, root: Path) -> str:
    return text.replace("{root}", str(root))


def check_refusal(status: int, out: str, err: str, cause: str) -> None:
    """Exit status 2, no traceback, and the cause in the last line of stderr, the command's one error line."""
    assert status == 2, (status, out[-2000:], err[-2000:])
    assert "Traceback" not in out + err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and cause in lines[-1], (cause, err[-2000:])
    assert sum("error" in line for line in lines) == 1, err[-2000:]


@pytest.mark.parametrize(("command", "argv", "cause"), CASES,
                         ids=[f"{command}-{' '.join(argv)[-40:]}" for command, argv, _ in CASES])
def test_bad_input_is_one_line_exit_2_no_traceback(commands, inputs, tmp_path, command, argv, cause):
    argv = [_expand(arg, inputs) for arg in argv]
    output_dir = tmp_path / "run"
    if command == "pretrain":  # each case breaks one thing of an otherwise runnable command line
        argv = [*(TRAIN if "--config" not in argv else []), *argv, "--output_dir", str(output_dir),
                "--data_cache_dir", str(tmp_path / "cache")]
        if "--data_files" not in argv:
            argv += ["--data_files", str(inputs / "data" / "good.txt")]
    status, out, err = commands(command, argv)
    check_refusal(status, out, err, _expand(cause, inputs))
    assert not output_dir.exists()  # refused before anything was built or written


# The same refusals reach a shell through the real executables (two: each costs a full import of its libraries).
SHELL_CASES = [
    ([sys.executable, str(REPO / "train" / "pretrain.py"), "--config", "{root}/configs/float.yaml"],
     "float.yaml: batch_size must be an integer, got 1.5"),
    ([sys.executable, "-m", "backpack", "senses", "{root}/model-int64", "bank"], "is stored as I64"),
]


def test_the_executables_print_the_same_one_line_and_exit_2(inputs, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    processes = [(subprocess.Popen([_expand(arg, inputs) for arg in argv], cwd=tmp_path, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE), cause)
                 for argv, cause in SHELL_CASES]  # all at once: their imports overlap
    for process, cause in processes:
        out, err = process.communicate(timeout=300)
        check_refusal(process.returncode, out, err, _expand(cause, inputs))


def test_a_full_disk_during_the_final_export_is_one_line_and_the_resume_writes_it(commands, inputs, tmp_path):
    """The final export hits a full disk: one line naming the file and the way on (a failed save: exit status 1),
    nothing half-written under the export's name; the same command with --resume latest then writes it."""
    output_dir = tmp_path / "run"
    argv = [*TRAIN, "--data_files", str(inputs / "data" / "good.txt"), "--max_steps", "2", "--save_interval", "2",
            "--eval_batches", "0", "--output_dir", str(output_dir), "--data_cache_dir", str(tmp_path / "cache")]
    status, out, err = commands("pretrain", argv, env={"BACKPACK_FAULT": "enospc@during:export/model.safetensors"})
    assert status == 1, err[-3000:]
    assert "Traceback" not in out + err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: could not write the final export {output_dir}/model: No space left on device: ")
    assert "--resume latest writes the export" in line and "(step 2)" in line
    assert not (output_dir / "model").exists()
    assert not [name for name in os.listdir(output_dir) if name.startswith(".model.")]  # nothing half-written

    status, out, err = commands("pretrain", [*argv, "--resume", "latest"])
    assert status == 0, err[-3000:]
    assert "Nothing to do" in out and json.loads((output_dir / "model" / "training_args.json").read_text()
                                                 )["metrics"]["step"] == 2
    mode = (output_dir / "model" / "model.safetensors").stat().st_mode & 0o777  # readable like the other files
    assert mode == (output_dir / "model" / "config.json").stat().st_mode & 0o777
