"""Pretraining end to end, in subprocesses exactly as a user runs it (tiny models, a slice of the offline corpus).

The whole file takes a few minutes on 2 CPU cores: every run is a fresh `python train/pretrain.py` (or
`accelerate launch`) of a 32-dimensional model for a handful of steps.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = str(REPO / "train" / "pretrain.py")
TINY = ["--config", "nano", "--n_embd", "32", "--n_layer", "2", "--n_head", "2", "--num_senses", "4",
        "--n_positions", "32", "--batch_size", "4", "--tokens_per_step", "256", "--max_documents", "40",
        "--eval_batches", "4", "--log_interval", "1", "--report_to", "none", "--learning_rate", "1e-2",
        "--warmup_steps", "2"]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> str:
    """One packed-data cache for every run of this file (the first run builds it)."""
    return str(tmp_path_factory.mktemp("pretrain-data"))


def run(args: list[str], output_dir: Path, data_cache: str, launcher: list[str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run train/pretrain.py in a fresh process; returns the finished process (output captured)."""
    command = (launcher or [sys.executable]) + [PRETRAIN, *TINY, "--data_cache_dir", data_cache,
                                                "--output_dir", str(output_dir), *args]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        output = result.stdout[-3000:] + "\n" + result.stderr[-4000:]
        raise AssertionError(f"pretrain failed ({result.returncode}):\n{output}")
    return result


def history(output_dir: Path, key: str = "train/loss") -> dict[int, float]:
    """Step -> value of one logged metric, from log_history.jsonl."""
    records = [json.loads(line) for line in (output_dir / "log_history.jsonl").read_text().splitlines()]
    return {record["step"]: record[key] for record in records if key in record}


def load_and_generate(folder: Path) -> str:
    """Load an exported folder in a fresh process through AutoModelForCausalLM and the pipeline; the sample."""
    script = (
        "import sys, json\n"
        "from transformers import AutoModelForCausalLM, pipeline\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "generator = pipeline('text-generation', model=sys.argv[1], trust_remote_code=True)\n"
        "out = generator('The history of', max_new_tokens=8, do_sample=False)[0]['generated_text']\n"
        "print(json.dumps({'class': type(model).__name__, 'text': out}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True,
                            timeout=300, cwd="/")  # not the repo: the folder's own code must be enough
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def backpack_run(tmp_path_factory, data_cache) -> Path:
    """A 10-step Backpack run on one process, no dropout (also the reference of the 2-process test)."""
    output_dir = tmp_path_factory.mktemp("backpack")
    run(["--max_steps", "10", "--eval_interval", "5", "--dropout", "0.0"], output_dir, data_cache)
    return output_dir


def test_short_run_lowers_loss_and_exports_a_loadable_folder(backpack_run):
    losses = history(backpack_run)
    assert sorted(losses) == list(range(1, 11))
    assert sum(losses[s] for s in (8, 9, 10)) < sum(losses[s] for s in (1, 2, 3)) - 0.3
    validation = history(backpack_run, "val/loss")
    assert validation[10] < validation[0]

    folder = backpack_run / "model"
    for name in ("model.safetensors", "config.json", "configuration_backpack_gpt2.py", "modeling_backpack_gpt2.py",
                 "tokenizer.json", "generation_config.json", "training_args.json"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_backpack_gpt2.BackpackGPT2LMHeadModel"
    exported = json.loads((folder / "training_args.json").read_text())
    assert exported["training_args"]["n_embd"] == 32
    assert exported["metrics"]["step"] == 10 and exported["metrics"]["val_loss"] == pytest.approx(validation[10])
    assert (backpack_run / "checkpoints" / "checkpoint_0" / "model" / "model.safetensors").is_file()

    loaded = load_and_generate(folder)
    assert loaded["class"] == "BackpackGPT2LMHeadModel"
    assert loaded["text"].startswith("The history of") and len(loaded["text"]) > len("The history of")


def test_two_processes_match_one_process(backpack_run, tmp_path, data_cache):
    """Same global batch (2 x 4 sequences vs 4 sequences x 2 accumulation): the same losses."""
    config = str(REPO / "train" / "accelerate_configs" / "cpu.yaml")
    launcher = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", config,
                "--num_processes", "2"]
    result = run(["--max_steps", "10", "--eval_interval", "5", "--dropout", "0.0", "--cpu", "true"],
                 tmp_path, data_cache, launcher=launcher)
    assert "2 process(es) x 4 sequences x 1 accumulation" in result.stdout + result.stderr
    for key in ("train/loss", "val/loss"):
        one, two = history(backpack_run, key), history(tmp_path, key)
        assert one.keys() == two.keys()
        for step in one:
            assert two[step] == pytest.approx(one[step], abs=1e-4), (key, step)


# The resume runs are scheduled for 1,000 steps and cut at step 8 (--stop_at_step keeps the schedule), so that a
# signal always lands mid-run however fast the machine is.
RESUME_ARGS = ["--max_steps", "1000", "--eval_interval", "1000", "--dropout", "0.1", "--save_interval", "3"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_cache) -> Path:
    """8 steps with dropout on (so the RNG state matters) and a checkpoint every 3 steps."""
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    run([*RESUME_ARGS, "--stop_at_step", "8"], output_dir, data_cache)
    assert sorted(history(output_dir)) == list(range(1, 9))  # --stop_at_step stops there
    return output_dir


def test_sigterm_saves_a_checkpoint_and_the_run_resumes_exactly(uninterrupted, tmp_path, data_cache):
    command = [sys.executable, PRETRAIN, *TINY, "--data_cache_dir", data_cache, "--output_dir", str(tmp_path),
               *RESUME_ARGS]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "log_history.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:  # wait for the first training step
        if log.exists() and '"train/loss"' in log.read_text():
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    assert "stopped by SIGTERM" in output
    stopped_at = max(history(tmp_path))
    assert 1 <= stopped_at < 8
    checkpoints = sorted(os.listdir(tmp_path / "checkpoints"))
    assert (tmp_path / "checkpoints" / checkpoints[-1] / "model" / "model.safetensors").is_file()

    run([*RESUME_ARGS, "--resume", "latest", "--stop_at_step", "8"], tmp_path, data_cache)
    expected, resumed = history(uninterrupted), history(tmp_path)
    for step in range(stopped_at + 1, 9):
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6), step


def test_gpt2_baseline_trains_and_exports(tmp_path, data_cache):
    run(["--model", "gpt2", "--max_steps", "10", "--eval_interval", "100", "--dropout", "0.0"], tmp_path,
        data_cache)
    losses = history(tmp_path)
    assert sum(losses[s] for s in (8, 9, 10)) < sum(losses[s] for s in (1, 2, 3)) - 0.3
    loaded = load_and_generate(tmp_path / "model")
    assert loaded["class"] == "GPT2LMHeadModel" and loaded["text"].startswith("The history of")

    # train/evaluate.py on the exported folder reproduces the run's final validation loss.
    result = subprocess.run(
        [sys.executable, str(REPO / "train" / "evaluate.py"), "--model_path", str(tmp_path / "model"),
         "--data_cache_dir", data_cache, "--max_documents", "40", "--max_batches", "4", "--batch_size", "4",
         "--output_json", str(tmp_path / "eval.json")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["loss"] == pytest.approx(history(tmp_path, "val/loss")[10], abs=1e-5)


def test_push_to_hub_publishes_each_export_through_hub_upload(tmp_path, data_cache):
    # A dry run stages and validates in a fresh process exactly as a push would, and sends nothing.
    result = run(["--max_steps", "2", "--eval_interval", "100", "--push_to_hub", "someone/backpack-test",
                  "--hub_dry_run", "true"], tmp_path, data_cache)
    output = result.stdout + result.stderr
    assert "Validating in a fresh process" in output
    assert "Dry run: this commit to someone/backpack-test would hold" in output
    assert "model.safetensors" in output and "modeling_backpack_gpt2.py" in output


def test_missing_data_file_fails_before_any_model_is_built(tmp_path, monkeypatch):
    from train import pretrain

    monkeypatch.setattr(pretrain, "build_model", lambda *_: pytest.fail("a model was built"))
    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match=f"data file not found: {missing}"):
        pretrain.main([*TINY, "--data_files", str(missing), "--output_dir", str(tmp_path)])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_cache):
    # An absurd learning rate blows the weights up after the first update, so step 2's loss is not finite.
    result = run(["--model", "gpt2", "--max_steps", "5", "--learning_rate", "1e30", "--warmup_steps", "0",
                  "--save_interval", "1", "--eval_interval", "100"], tmp_path, data_cache, check=False)
    assert result.returncode == 1
    assert "stopping without saving" in result.stderr
    assert os.listdir(tmp_path / "checkpoints") == ["checkpoint_0"]  # saved after step 1, nothing after
