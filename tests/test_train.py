"""Pretraining end to end, in subprocesses exactly as a user runs it (tiny models, a slice of the offline corpus).

The whole file takes a few minutes on 2 CPU cores: every run is a fresh `python train/pretrain.py` (or
`accelerate launch`) of a 32-dimensional model for a handful of steps.
"""

import json
import os
import re
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
        check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run train/pretrain.py in a fresh process; returns the finished process (output captured)."""
    command = (launcher or [sys.executable]) + [PRETRAIN, *TINY, "--data_cache_dir", data_cache,
                                                "--output_dir", str(output_dir), *args]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=None if env is None else {**os.environ, **env})
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
    # The sense network ran once per distinct word of each 256-token step (real text repeats words).
    sense_words = history(backpack_run, "train/sense_network_words_per_step")
    assert sorted(sense_words) == list(range(1, 11)) and all(0 < words < 256 for words in sense_words.values())

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


def test_compiled_training_is_one_graph_that_never_recompiles_per_step(backpack_run, tmp_path, data_cache):
    """`--compile true`: the forward is one graph (a graph break would fail the run) of static shapes, so after the
    first evaluation and the first training step nothing compiles again; the losses are the eager run's."""
    result = run(["--max_steps", "10", "--eval_interval", "5", "--dropout", "0.0", "--compile", "true"], tmp_path,
                 data_cache, env={"TORCH_LOGS": "recompiles,graph_breaks"})
    logs = result.stdout + result.stderr
    assert "Graph break" not in logs
    # a shared table reaches the compiled forward as each micro-batch's rows: one shape, no padding needed
    assert "once per distinct word of each step, exact word lists" in logs
    # One recompilation only: training after the first validation (grad mode on); 10 steps and 3 validations.
    assert logs.count("Recompiling function") == 1, logs[-3000:]
    eager, compiled = history(backpack_run), history(tmp_path)
    assert sorted(compiled) == sorted(eager)
    for step, loss in eager.items():
        assert compiled[step] == pytest.approx(loss, abs=2e-3), step


def test_gpt2_baseline_trains_and_exports(tmp_path, data_cache):
    run(["--model", "gpt2", "--max_steps", "10", "--eval_interval", "100", "--dropout", "0.0"], tmp_path,
        data_cache)
    losses = history(tmp_path)
    assert sum(losses[s] for s in (8, 9, 10)) < sum(losses[s] for s in (1, 2, 3)) - 0.3
    assert not history(tmp_path, "train/sense_network_words_per_step")  # GPT-2 has no sense network
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

    # Nothing scored is an error, never a perplexity of 1 (or NaN) reported as a result.
    nothing = subprocess.run(
        [sys.executable, str(REPO / "train" / "evaluate.py"), "--model_path", str(tmp_path / "model"),
         "--data_cache_dir", data_cache, "--max_documents", "40", "--max_batches", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert nothing.returncode == 2 and "no token was scored (--max_batches 0)" in nothing.stderr, nothing.stderr


def test_push_to_hub_publishes_each_export_through_hub_upload(tmp_path, data_cache):
    # A dry run stages and validates in a fresh process exactly as a push would, and sends nothing.
    result = run(["--max_steps", "2", "--eval_interval", "100", "--push_to_hub", "someone/backpack-test",
                  "--hub_dry_run", "true"], tmp_path, data_cache)
    output = result.stdout + result.stderr
    assert "Validating in a fresh process" in output
    assert "Dry run: this commit to someone/backpack-test would hold" in output
    assert "model.safetensors" in output and "modeling_backpack_gpt2.py" in output


def test_missing_data_file_fails_before_any_model_is_built(tmp_path, monkeypatch):
    from backpack_train import pretrain

    monkeypatch.setattr(pretrain, "build_model", lambda *_: pytest.fail("a model was built"))
    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match=f"data file not found: {missing}"):
        pretrain.main([*TINY, "--data_files", str(missing), "--output_dir", str(tmp_path)])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_cache):
    # An absurd learning rate blows the weights up after the first update, so step 2's loss is not finite. The loss
    # is read back only every 5 steps; the save after step 2 checks it first.
    result = run(["--model", "gpt2", "--max_steps", "5", "--learning_rate", "1e30", "--warmup_steps", "0",
                  "--save_interval", "1", "--eval_interval", "100", "--log_interval", "5"], tmp_path, data_cache,
                 check=False)
    assert result.returncode == 1
    assert "error: the training loss is not finite (NaN or inf) at step 2; stopping without saving" in result.stderr
    assert os.listdir(tmp_path / "checkpoints") == ["checkpoint_0"]  # saved after step 1, nothing after
    named = re.search(r"The newest complete checkpoint is (\S+) \(step 1\)", result.stderr)
    assert named and Path(named.group(1)) == tmp_path / "checkpoints" / "checkpoint_0", result.stderr[-2000:]


def test_stop_at_step_zero_saves_the_initial_state_and_no_validation_records_no_metric(tmp_path, data_cache):
    result = run(["--max_steps", "10", "--stop_at_step", "0", "--eval_batches", "0"], tmp_path, data_cache)
    output = result.stdout + result.stderr
    assert "step 0: no validation (--eval_batches 0): no validation metric is recorded" in output
    assert not (tmp_path / "log_history.jsonl").exists()  # no step trained, no metric logged
    checkpoint = tmp_path / "checkpoints" / "checkpoint_0"
    assert json.loads((checkpoint / "training_state.json").read_text())["step"] == 0
    assert json.loads((checkpoint / "checkpoint.json").read_text())["step"] == 0
    metrics = json.loads((tmp_path / "model" / "training_args.json").read_text())["metrics"]
    assert metrics["step"] == 0
    assert not [key for key in metrics if "val" in key]  # never a perplexity of 1.0 from zero tokens
    assert "validation perplexity not measured" in output

    # The same folder again without --resume is refused before anything is touched.
    again = run(["--max_steps", "10", "--stop_at_step", "1"], tmp_path, data_cache, check=False)
    assert again.returncode == 1
    assert f"error: {tmp_path} already holds a run (checkpoints, model)" in again.stderr


def test_a_used_output_folder_is_refused_before_anything_is_touched(tmp_path, monkeypatch):
    from backpack_train import pretrain
    from backpack_train.run_folder import OutputDirError

    monkeypatch.setattr(pretrain, "prepare_datasets", lambda *_, **__: pytest.fail("data was prepared"))
    monkeypatch.setattr(pretrain, "build_model", lambda *_: pytest.fail("a model was built"))
    (tmp_path / "log_history.jsonl").write_text('{"step": 1, "train/loss": 5.0}\n')
    (tmp_path / "checkpoints" / "checkpoint_0").mkdir(parents=True)
    before = sorted(str(path) for path in tmp_path.rglob("*"))
    with pytest.raises(OutputDirError, match="already holds a run .*--resume latest.*--overwrite_output_dir true"):
        pretrain.main([*TINY, "--output_dir", str(tmp_path)])
    with pytest.raises(OutputDirError, match="contradict"):
        pretrain.main([*TINY, "--output_dir", str(tmp_path), "--resume", "latest", "--overwrite_output_dir", "true"])
    # Nothing changed but the lock file (which says who last held the folder, and stays).
    assert sorted(str(path) for path in tmp_path.rglob("*") if path.name != "trainer.lock") == before
    assert (tmp_path / "log_history.jsonl").read_text() == '{"step": 1, "train/loss": 5.0}\n'


def test_overwrite_output_dir_removes_only_the_earlier_run(tmp_path):
    from backpack_train.run_folder import clear_output_dir

    for name in ("checkpoints/checkpoint_0", "model", "logs/pretrain"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "log_history.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("mine")
    said = []
    clear_output_dir(str(tmp_path), said.append)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]
    assert said and "checkpoints, log_history.jsonl, model, logs" in said[0]


def test_bad_data_files_are_named_before_any_model_is_built(tmp_path, monkeypatch):
    from backpack_train import pretrain

    monkeypatch.setattr(pretrain, "build_model", lambda *_: pytest.fail("a model was built"))
    cases = {"empty.txt": (b"", "data file is empty"), "latin1.txt": ("café".encode("latin-1"), "not UTF-8"),
             "binary.jsonl": (bytes(range(256)) * 4, "binary, not text")}
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match=f"{message}.*{path}"):
            pretrain.main([*TINY, "--data_files", str(path), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_warmup_longer_than_the_run_is_scaled_down_with_a_note():
    from backpack_train.config import DataArguments, TrainArguments, parse_args, shorten_warmup

    _, args = parse_args((DataArguments, TrainArguments), ["--config", "nano", "--max_steps", "10"])
    assert args.warmup_steps == 12
    note = shorten_warmup(args)
    assert args.warmup_steps == 1 and "warmup_steps 12 >= max_steps 10" in note and "using 1 warm-up" in note
    _, args = parse_args((DataArguments, TrainArguments), ["--config", "nano"])
    assert shorten_warmup(args) is None and args.warmup_steps == 12
    with pytest.raises(ValueError, match="stop_at_step must be >= 0"):
        parse_args((DataArguments, TrainArguments), ["--stop_at_step", "-1"])
