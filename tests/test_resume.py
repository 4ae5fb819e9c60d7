"""Resuming a run as users do after losing GPUs or changing their mind: another number of processes, another split
of the same global batch, another global batch, other hyper-parameters on the command line.

One uninterrupted 6-step run (dropout off, a checkpoint every 2 steps) is the reference; each test continues a copy
of one of its checkpoints. Single-process runs are forked from a server that has already imported torch
(tests/forked_trainer.py); the 2-process run is `accelerate launch` with 2 gloo processes on the CPU.
"""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from forked_trainer import TINY, ForkedTrainer
from safetensors.torch import load_file

from backpack.checkpoints import checkpoint_dirs, read_training_state

REPO = Path(__file__).resolve().parents[1]
# Dropout off: the only difference a topology makes is then the order of float sums. The schedule is 1,000 steps,
# cut with --stop_at_step (which keeps it).
ARGS = [*TINY, "--eval_batches", "2", "--max_steps", "1000", "--eval_interval", "1000", "--dropout", "0.0",
        "--save_interval", "2", "--save_total_limit", "10"]
SEED = 1111  # the nano config's
SEQUENCES_PER_STEP = 8  # 256 tokens per step / 32 positions


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("pretrain-data"))


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, data_cache):
    """``trainer(output_dir, *args) -> (exit code, output)``: one process, the tiny model, ``args`` last."""
    forked = ForkedTrainer(tmp_path_factory.mktemp("logs"))

    def run(output_dir: Path, *args: str, tiny: bool = True) -> tuple[int, str]:
        return forked([*(ARGS if tiny else []), "--data_cache_dir", data_cache, "--output_dir", str(output_dir),
                       *args])

    return run


@pytest.fixture(scope="module")
def reference(trainer, tmp_path_factory) -> Path:
    """6 steps on one process (4 sequences x 2 accumulation), never stopped; checkpoints at steps 2, 4 and 6."""
    output_dir = tmp_path_factory.mktemp("reference")
    code, output = trainer(output_dir, "--stop_at_step", "6")
    assert code == 0, output[-3000:]
    assert "1 process(es) x 4 sequences x 2 accumulation = 256 tokens/step" in output
    return output_dir


def losses(output_dir: Path, key: str = "train/loss") -> dict[int, float]:
    records = [json.loads(line) for line in (output_dir / "log_history.jsonl").read_text().splitlines()]
    return {record["step"]: record[key] for record in records if key in record}


def checkpoints_by_step(output_dir: Path) -> dict[int, Path]:
    return {read_training_state(folder).step: Path(folder) for folder in checkpoint_dirs(str(output_dir))}


def continue_from(reference: Path, step: int, output_dir: Path) -> Path:
    """A run folder holding only the reference's checkpoint of ``step``; returns that checkpoint's copy."""
    copy = output_dir / "checkpoints" / "checkpoint_0"
    shutil.copytree(checkpoints_by_step(reference)[step], copy)
    return copy


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_processes(output_dir: Path, data_cache: str, *args: str) -> str:
    """train/pretrain.py under `accelerate launch` with 2 gloo CPU processes; returns its output."""
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
               str(REPO / "train" / "accelerate_configs" / "cpu.yaml"), "--num_processes", "2",
               "--main_process_port", str(free_port()), str(REPO / "train" / "pretrain.py"), *ARGS, "--cpu", "true",
               "--data_cache_dir", data_cache, "--output_dir", str(output_dir), *args]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def test_resume_on_another_process_count_and_batch_split_continues_the_run_exactly(reference, trainer, data_cache,
                                                                                   tmp_path):
    """1 process (4 x 2 accumulation) -> 2 processes (4 x 1) -> 1 process (2 x 4): the same global batch of 8
    sequences throughout, so the same sequences, losses and weights as the run that never stopped."""
    continue_from(reference, 2, tmp_path)
    output = two_processes(tmp_path, data_cache, "--resume", "latest", "--stop_at_step", "4")
    assert "2 process(es) x 4 sequences x 1 accumulation = 256 tokens/step" in output
    assert "Resumed from" in output and "at step 2 (sequence 16 of the data order)" in output

    code, output = trainer(tmp_path, "--batch_size", "2", "--resume", "latest", "--stop_at_step", "6")
    assert code == 0, output[-3000:]
    assert "1 process(es) x 2 sequences x 4 accumulation = 256 tokens/step" in output
    assert "batch_size 2 (checkpoint: 4)" in output
    assert "was saved by 2 process(es), this run has 1" in output

    expected, resumed = losses(reference), losses(tmp_path)
    assert sorted(resumed) == [3, 4, 5, 6]
    for step, loss in resumed.items():  # bit-equal but for the order of float sums
        assert loss == pytest.approx(expected[step], abs=1e-5, rel=0), step

    ours, theirs = checkpoints_by_step(tmp_path), checkpoints_by_step(reference)
    assert sorted(ours) == [2, 4, 6]
    assert read_training_state(ours[6]).sequences == 6 * SEQUENCES_PER_STEP
    for before, after in ((2, 4), (4, 6)):  # the optimizer stepped after each resume
        old, new = weights(ours[before]), weights(ours[after])
        moved = max((new[name] - old[name]).abs().max().item() for name in new)
        assert moved > 5e-3, (before, after, moved)
    for step in (4, 6):  # and to the same weights (Adam turns rounding noise in tiny gradients into ~1e-5)
        ours_now, theirs_now = weights(ours[step]), weights(theirs[step])
        assert max((ours_now[name] - theirs_now[name]).abs().max().item() for name in ours_now) < 1e-3, step


def test_a_new_global_batch_continues_from_the_same_data_position(reference, trainer, data_cache, tmp_path):
    """--tokens_per_step 512 after step 4 (of 8 sequences each): step 5 reads the 16 sequences at positions 32-47
    of the data order, checked against the documented order (epoch 0 = randperm(N, seed)) and the step-4 weights."""
    from backpack.tokenizer import gpt2_tokenizer
    from backpack_train.config import DataArguments
    from backpack_train.data import collate_blocks, prepare_datasets
    from backpack_train.loss import token_losses
    from modeling_backpack_gpt2 import BackpackGPT2LMHeadModel

    start = continue_from(reference, 4, tmp_path)
    code, output = trainer(tmp_path, "--tokens_per_step", "512", "--resume", "latest", "--stop_at_step", "5")
    assert code == 0, output[-3000:]
    assert "tokens_per_step 512 (checkpoint: 256)" in output
    assert ("global batch 16 sequences (512 tokens) per step (checkpoint: 8): the run continues from sequence 32 "
            "of the data order with the new batch") in output
    state = read_training_state(checkpoints_by_step(tmp_path)[5])
    assert (state.sequences, state.tokens, state.sequences_per_step) == (48, 4 * 256 + 512, 16)

    packed = prepare_datasets(DataArguments(max_documents=40, data_cache_dir=data_cache),
                              gpt2_tokenizer(model_max_length=32), block_size=33)
    train = packed["train"]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(SEED))
    batch = collate_blocks([train[index] for index in order[32:48].tolist()])
    model = BackpackGPT2LMHeadModel.from_pretrained(start / "model").eval()
    with torch.no_grad():
        expected = (token_losses(model, batch).sum() / (batch["targets"] != -100).sum()).item()
    assert losses(tmp_path)[5] == pytest.approx(expected, abs=1e-5)


def test_hyperparameters_given_at_resume_are_used_and_said(reference, trainer, tmp_path):
    """Only --resume and the new values on the command line: the rest (shape, data, batch) is the checkpoint's."""
    from transformers import get_scheduler

    continue_from(reference, 4, tmp_path)
    code, output = trainer(tmp_path, "--resume", "latest", "--stop_at_step", "6", "--learning_rate", "1e-3",
                           "--lr_scheduler", "cosine", "--warmup_steps", "0", "--max_steps", "20", "--weight_decay",
                           "0.0", "--max_grad_norm", "0.5", "--save_interval", "1", "--eval_interval", "5",
                           "--seed", "7", tiny=False)
    assert code == 0, output[-3000:]
    for line in ("learning_rate 0.001 (checkpoint: 0.01)", "lr_scheduler cosine (checkpoint: linear)",
                 "warmup_steps 0 (checkpoint: 2)", "max_steps 20 (checkpoint: 1000)",
                 "weight_decay 0.0 (checkpoint: 0.1)", "max_grad_norm 0.5 (checkpoint: 1.0)",
                 "save_interval 1 (checkpoint: 2)", "eval_interval 5 (checkpoint: 1000)",
                 "warning: seed 7 (checkpoint: 1111)"):
        assert line in output, line
    assert "n_embd" not in output and "max_documents" not in output  # not given: the checkpoint's, silently
    assert "backpack: 1,666,336 parameters | 1 process(es) x 4 sequences x 2 accumulation" in output

    # The learning rate is the new schedule's, at the run's step.
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=20)
    expected_rates = {}
    for step in range(1, 7):
        optimizer.step()
        schedule.step()
        expected_rates[step] = schedule.get_last_lr()[0]
    logged_rates = losses(tmp_path, "train/lr")
    assert sorted(logged_rates) == [5, 6]
    for step, rate in logged_rates.items():
        assert rate == pytest.approx(expected_rates[step], rel=1e-12), step
    assert 5 in losses(tmp_path, "val/loss")  # the new eval_interval

    # The optimizer really holds the new values (what `load_state` restored was replaced).
    saved = torch.load(checkpoints_by_step(tmp_path)[5] / "optimizer.bin", weights_only=True)
    for group in saved["param_groups"]:
        assert group["weight_decay"] == 0.0 and group["initial_lr"] == 1e-3
        assert group["lr"] == pytest.approx(expected_rates[5], rel=1e-12)

    # The export records the values used: the new ones and the checkpoint's.
    used = json.loads((tmp_path / "model" / "training_args.json").read_text())["training_args"]
    assert (used["learning_rate"], used["lr_scheduler"], used["max_steps"], used["seed"]) == (1e-3, "cosine", 20, 7)
    assert (used["n_embd"], used["num_senses"], used["max_documents"], used["batch_size"]) == (32, 4, 40, 4)


def test_settings_the_weights_fix_cannot_change_at_resume(reference, trainer, tmp_path):
    continue_from(reference, 2, tmp_path)
    before = sorted((str(path), path.stat().st_mtime_ns) for path in tmp_path.rglob("*"))
    code, output = trainer(tmp_path, "--resume", "latest", "--n_embd", "64", "--num_senses", "8", "--model", "gpt2")
    assert code == 2, output[-3000:]
    assert ("error: cannot resume with model gpt2 (checkpoint: backpack), n_embd 64 (checkpoint: 32), num_senses 8 "
            "(checkpoint: 4)") in output
    assert "Traceback" not in output and "data ready" not in output
    after = sorted((str(path), path.stat().st_mtime_ns) for path in tmp_path.rglob("*") if path.name != "trainer.lock")
    assert after == before
