"""Crash safety of the trainer: kill -9, a full disk and a second signal at chosen points of a save, then resume.

Faults are injected deterministically (``BACKPACK_FAULT``, train/faults.py), never by timing. Every run is a
separate process forked from a server that has already imported torch and transformers (tests/forked_trainer.py);
``os.kill(SIGKILL)`` ends it as ``kill -9`` would. One run after another resumes the previous one's output folder
with ``--resume latest``: each checks what the previous fault left behind, and the losses of every run are
compared with an uninterrupted run's.
"""

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
from forked_trainer import TINY, ForkedTrainer

from backpack.checkpoints import checkpoint_dirs, read_training_state, verify_checkpoint

# Dropout on (the generator states matter), a checkpoint after every step, one kept. The schedule is 1,000 steps,
# cut with --stop_at_step (which keeps the schedule).
ARGS = [*TINY, "--eval_batches", "2", "--max_steps", "1000", "--eval_interval", "1000", "--dropout", "0.1",
        "--save_interval", "1", "--save_total_limit", "1"]
LAST_STEP = 5


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """``trainer(output_dir, *args, fault=None) -> (exit code, output)``; a killed run's code is -9."""
    data_cache = str(tmp_path_factory.mktemp("pretrain-data"))
    forked = ForkedTrainer(tmp_path_factory.mktemp("logs"))

    def run(output_dir: Path, *args: str, fault: str | None = None) -> tuple[int, str]:
        return forked([*ARGS, "--data_cache_dir", data_cache, "--output_dir", str(output_dir), *args], fault=fault)

    return run


def losses(output_dir: Path) -> dict[int, float]:
    """Step -> training loss, from log_history.jsonl."""
    records = [json.loads(line) for line in (output_dir / "log_history.jsonl").read_text().splitlines()]
    return {record["step"]: record["train/loss"] for record in records if "train/loss" in record}


@pytest.fixture(scope="module")
def reference(trainer, tmp_path_factory) -> Path:
    """An uninterrupted run to LAST_STEP (keeping two checkpoints, for the corruption tests below)."""
    output_dir = tmp_path_factory.mktemp("reference")
    code, output = trainer(output_dir, "--stop_at_step", str(LAST_STEP), "--save_total_limit", "2")
    assert code == 0, output[-3000:]
    assert sorted(losses(output_dir)) == list(range(1, LAST_STEP + 1))
    return output_dir


def assert_same_losses(output_dir: Path, reference: Path) -> None:
    expected = losses(reference)
    for step, loss in losses(output_dir).items():
        assert loss == pytest.approx(expected[step], abs=1e-6), step


def resumed_step(output: str) -> int:
    match = re.search(r"Resumed from (\S+) at step (\d+)", output)
    assert match, output[-3000:]
    return int(match.group(2))


def assert_only_complete_checkpoints(output_dir: Path) -> int:
    """Every visible checkpoint verifies (no partial folder under a final name); returns the newest's step."""
    folders = checkpoint_dirs(str(output_dir))
    assert folders, "no checkpoint left"
    steps = [verify_checkpoint(folder).step for folder in folders]
    return steps[-1]


# (BACKPACK_FAULT, exit code, whether the checkpoint of the faulted save survives, what the run must print).
# Each fault hits the first save of a run that resumed at step s and trained step s + 1.
FAULTS = [
    ("before:save", -9, False, None),
    ("during:model.safetensors", -9, False, None),  # Accelerate's weights (safetensors' writer), half written
    ("after:optimizer.bin", -9, False, None),
    ("during:optimizer.bin", -9, False, None),  # torch.save's writer
    ("during:scheduler.bin", -9, False, None),
    ("during:rng_state_0.safetensors", -9, False, None),
    ("during:training_state.json", -9, False, None),
    ("during:model/model.safetensors", -9, False, None),  # the export (transformers' writer)
    ("after:model/", -9, False, None),  # everything written but the manifest
    ("during:checkpoint.json", -9, False, None),
    ("after:checkpoint.json", -9, False, None),  # complete, but not yet renamed into place
    ("after:rename", -9, True, None),  # in place, the older one not yet pruned
    ("during:remove", -9, True, None),  # the older one hidden for removal, not yet deleted
    ("enospc@during:optimizer.bin", 1, False, r"No space left on device: \S+/\.checkpoint_\d+\.tmp-\S+/optimizer\.bin"),
    ("fsize@before:optimizer.bin", 1, False, r"File too large: \S+/\.checkpoint_\d+\.tmp-[^/\s]+\."),  # torch's writer
    ("sigterm@after:step,sigterm@after:optimizer.bin", 128 + 15, False, "SIGTERM again while stopping"),
]


def test_kill_full_disk_and_second_signal_during_saves_then_resume_exactly(trainer, reference, tmp_path):
    output_dir = tmp_path / "run"
    code, output = trainer(output_dir, "--stop_at_step", "2")
    assert code == 0, output[-3000:]
    position = assert_only_complete_checkpoints(output_dir)
    assert position == 2

    previous_output = output
    for fault, expected_code, survives, message in FAULTS:
        code, output = trainer(output_dir, "--resume", "latest", "--stop_at_step", str(LAST_STEP), fault=fault)
        assert resumed_step(output) == position, (fault, previous_output[-2000:])
        assert code == expected_code, (fault, output[-3000:])
        if expected_code == -9:
            assert f"[fault injected: kill@{fault}#1]" in output
        if message:
            assert re.search(message, output), (fault, output[-3000:])
        if expected_code == 1:  # the failed save names the file or folder and the checkpoint that remains
            assert "earlier checkpoints are untouched" in output and "newest complete checkpoint is" in output
        position += survives
        assert assert_only_complete_checkpoints(output_dir) == position, fault
        assert_same_losses(output_dir, reference)
        previous_output = output

    # What interrupted saves and removals left behind was removed by the next save (or the failed save itself).
    assert not [name for name in os.listdir(output_dir / "checkpoints") if name.startswith(".")]

    # A first SIGTERM stops at the last step and saves it; a second one lands in the final export.
    assert position == LAST_STEP - 1
    code, output = trainer(output_dir, "--resume", "latest", "--stop_at_step", str(LAST_STEP),
                           fault="sigterm@after:step,sigterm@during:export/model.safetensors")
    assert code == 128 + 15, output[-3000:]
    assert f"newest complete checkpoint is {checkpoint_dirs(str(output_dir))[-1]} (step {LAST_STEP})" in output
    assert assert_only_complete_checkpoints(output_dir) == LAST_STEP
    assert not [name for name in os.listdir(output_dir) if name.startswith(".model.")]  # no partial export left
    assert json.loads((output_dir / "model" / "training_args.json").read_text())["metrics"]["step"] == 2

    # Resuming the finished run trains nothing; it only replaces the earlier step's final export.
    code, output = trainer(output_dir, "--resume", "latest", "--stop_at_step", str(LAST_STEP))
    assert code == 0, output[-3000:]
    assert f"Nothing to do: {checkpoint_dirs(str(output_dir))[-1]} is at step {LAST_STEP}" in output
    assert "was from step 2" in output
    export = output_dir / "model"
    assert json.loads((export / "training_args.json").read_text())["metrics"]["step"] == LAST_STEP
    checkpoint_export = Path(checkpoint_dirs(str(output_dir))[-1]) / "model"
    assert (export / "model.safetensors").read_bytes() == (checkpoint_export / "model.safetensors").read_bytes()

    assert sorted(losses(output_dir)) == list(range(1, LAST_STEP + 1))
    assert_same_losses(output_dir, reference)

    # Once more: nothing at all is written (but the lock file's record of who holds the folder).
    before = snapshot(output_dir, ignore=("trainer.lock",))
    code, output = trainer(output_dir, "--resume", "latest", "--stop_at_step", str(LAST_STEP))
    assert code == 0 and "Nothing to do" in output and "copied" not in output
    assert snapshot(output_dir, ignore=("trainer.lock",)) == before


def snapshot(folder: Path, ignore: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder`` with its size and modification time (but the names in ``ignore``)."""
    return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns) for path in
            [folder, *folder.rglob("*")] if path.name not in ignore}


class _Payload:
    """Unpickling this creates a file: what a crafted ``custom_checkpoint_0.pkl`` could do (and worse)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_corrupt_foreign_and_crafted_checkpoints_are_skipped_and_never_deleted(trainer, reference, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(reference, output_dir)
    older, newest = checkpoint_dirs(str(output_dir))
    assert read_training_state(older).step == LAST_STEP - 1 and read_training_state(newest).step == LAST_STEP
    flip_a_bit(Path(newest) / "model.safetensors")  # same size: only the SHA-256 tells
    shutil.copytree(older, output_dir / "checkpoints" / "checkpoint_7_broken")  # foreign names are ignored
    (output_dir / "checkpoints" / "notes").mkdir()

    code, output = trainer(output_dir, "--resume", "latest", "--stop_at_step", str(LAST_STEP),
                           "--save_total_limit", "2")
    assert code == 0, output[-3000:]
    assert f"warning: skipping {newest}: model.safetensors does not match its SHA-256" in output
    assert resumed_step(output) == LAST_STEP - 1
    assert_same_losses(output_dir, reference)
    folders = checkpoint_dirs(str(output_dir))
    assert folders[:2] == [older, newest]  # the checkpoint resumed from and the corrupt one are both kept
    assert read_training_state(folders[-1]).step == LAST_STEP and len(folders) == 3
    assert (output_dir / "checkpoints" / "checkpoint_7_broken").is_dir()

    # A pickle slipped into a checkpoint is never loaded: --resume PATH refuses it, --resume latest skips it.
    marker = tmp_path / "payload-ran"
    (Path(folders[-1]) / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Payload(str(marker))))
    code, output = trainer(output_dir, "--resume", folders[-1], "--stop_at_step", str(LAST_STEP + 1))
    assert code == 1, output[-3000:]
    assert f"error: --resume {folders[-1]}: cannot resume from it" in output
    assert "custom_checkpoint_0.pkl" in output and "would unpickle" in output
    code, output = trainer(output_dir, "--resume", "latest", "--stop_at_step", str(LAST_STEP))
    assert code == 0, output[-3000:]
    assert f"skipping {folders[-1]} holds files its checkpoint.json does not list: custom_checkpoint_0.pkl" in output
    assert resumed_step(output) == LAST_STEP - 1
    assert not marker.exists()


def flip_a_bit(path: Path) -> None:
    """Corrupt a file without changing its size: one bit of its last byte (a weight's sign, in a weights file)."""
    content = bytearray(path.read_bytes())
    content[-1] ^= 0x80
    path.write_bytes(bytes(content))


def test_a_run_whose_checkpoints_are_all_corrupt_is_never_started_over(trainer, reference, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(reference, output_dir)
    older, newest = checkpoint_dirs(str(output_dir))
    weights = Path(older) / "optimizer.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])  # truncated
    flip_a_bit(Path(newest) / "model.safetensors")  # same size
    before = snapshot(output_dir, ignore=("trainer.lock",))

    code, output = trainer(output_dir, "--resume", "latest", "--stop_at_step", str(LAST_STEP + 2))
    assert code == 1, output[-3000:]
    assert "error: --resume latest: none of the 2 checkpoint(s)" in output
    assert f"{newest}: model.safetensors does not match its SHA-256" in output
    assert f"{older}: optimizer.bin has" in output and "(truncated or replaced)" in output
    assert "start over with --overwrite_output_dir true" in output
    assert "Traceback" not in output
    assert snapshot(output_dir, ignore=("trainer.lock",)) == before  # nothing pruned, nothing written


def test_a_file_that_does_not_read_back_stops_the_manifest(tmp_path):
    import torch
    from safetensors.torch import save_file

    from backpack_train.checkpointing import CheckpointError, check_readable

    save_file({"weight": torch.arange(1000.0)}, str(tmp_path / "model.safetensors"))
    torch.save({"state": {0: {"exp_avg": torch.ones(1000)}}}, tmp_path / "optimizer.bin")
    (tmp_path / "training_state.json").write_text('{"step": 1}')
    for name in ("model.safetensors", "optimizer.bin", "training_state.json"):
        check_readable(str(tmp_path / name))
        content = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(content[: len(content) // 2])
        with pytest.raises(CheckpointError, match=f"{tmp_path / name}: "):
            check_readable(str(tmp_path / name))


def test_fault_specs_are_checked():
    from backpack_train.faults import Fault, parse

    assert parse("after:optimizer.bin") == [Fault("kill", "after", "optimizer.bin", 1)]
    assert parse("sigterm@after:step#3, enospc@during:model/model.safetensors#2") == [
        Fault("sigterm", "after", "step", 3), Fault("enospc", "during", "model/model.safetensors", 2)]
    for bad in ("optimizer.bin", "explode@after:save", "while:save", "after:save#x"):
        with pytest.raises(ValueError, match="BACKPACK_FAULT: cannot read"):
            parse(bad)


def test_the_file_module_reports_every_write_rename_and_removal_to_its_fault_hook(tmp_path):
    """The one boundary faults are injected at: each point of a crash-safe write, rename and removal reaches the
    hook, and faults.py names a file by its place in the checkpoint or the export being written."""
    from backpack import files
    from backpack_train.faults import target_of

    seen = []
    (tmp_path / "checkpoints").mkdir()
    files.set_fault_hook(lambda operation, when, path, written: seen.append((operation, when, path, written)))
    try:
        temporary = files.make_hidden_folder(str(tmp_path / "checkpoints" / "checkpoint_0"))
        files.write_json_atomically(os.path.join(temporary, "training_state.json"), {"step": 1})
        files.rename_into_place(temporary, str(tmp_path / "checkpoints" / "checkpoint_0"))
        files.remove_tree(str(tmp_path / "checkpoints" / "checkpoint_0"))
    finally:
        files.set_fault_hook(None)
    state = os.path.join(temporary, "training_state.json")
    assert [entry[:3] for entry in seen] == [
        ("create", "before", temporary), ("write", "before", state), ("write", "during", state),
        ("write", "after", state), ("rename", "before", str(tmp_path / "checkpoints" / "checkpoint_0")),
        ("rename", "after", str(tmp_path / "checkpoints" / "checkpoint_0")),
        ("remove", "before", str(tmp_path / "checkpoints" / "checkpoint_0")),
        ("remove", "during", str(tmp_path / "checkpoints" / "checkpoint_0"))]
    assert seen[2][3].endswith(".tmp") and not os.path.exists(seen[2][3])  # "during": the data before its rename
    assert target_of(state) == "training_state.json"
    assert target_of(os.path.join(temporary, "model", "model.safetensors")) == "model/model.safetensors"
    assert target_of(str(tmp_path / ".model.tmp-1f-42" / "config.json")) == "export/config.json"
    assert target_of(str(tmp_path / "log_history.jsonl")) is None
