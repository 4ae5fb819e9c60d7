"""Training on several processes as a user launches it: DDP, FSDP2, compiled, two machines (2 gloo CPU processes).

Every run is `accelerate launch` of train/pretrain.py with one of the project's own configs
(train/accelerate_configs/cpu.yaml, fsdp_cpu.yaml) on a 32-dimensional Backpack for 6 steps, dropout off, so that
runs of different topologies must give the same losses. The compiled runs use torch.compile's `aot_eager` backend
(TORCH_COMPILE_OVERRIDE_BACKENDS): dynamo captures the same graphs (a graph break or a recompilation shows the same
way) without inductor's C++ builds, which take minutes on a CPU; inductor itself is tested on one process in
tests/test_train.py and on the GPU by bench/device_check.sh.
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from backpack_train.parallel import Parallelism, ParallelismError, check_parallelism, consume_fsdp_request

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = str(REPO / "train" / "pretrain.py")
CONFIGS = REPO / "train" / "accelerate_configs"
TINY = ["--config", "nano", "--n_embd", "32", "--n_layer", "2", "--n_head", "2", "--num_senses", "4",
        "--n_positions", "32", "--batch_size", "4", "--tokens_per_step", "256", "--max_documents", "40",
        "--eval_batches", "4", "--log_interval", "1", "--report_to", "none", "--learning_rate", "1e-2",
        "--warmup_steps", "2", "--dropout", "0.0", "--max_steps", "6", "--eval_interval", "3", "--save_interval", "3",
        "--cpu", "true"]
COMPILED = {"TORCH_COMPILE_OVERRIDE_BACKENDS": ">=0:aot_eager", "TORCH_LOGS": "recompiles,graph_breaks"}


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("pretrain-data"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(config: str | None, output_dir: Path, data_cache: str, args: list[str] = (), processes: int = 2,
                   machine: list[str] = ()) -> list[str]:
    """`accelerate launch --config_file CONFIG ... train/pretrain.py TINY ...` (config None: plain `python`);
    ``machine``: the launcher's several-machines arguments (rank, rank 0's address and port)."""
    launcher = [sys.executable]
    if config is not None:
        launcher += ["-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", str(CONFIGS / config),
                     "--num_processes", str(processes),
                     *(machine or ["--main_process_port", str(free_port())])]
    return [*launcher, PRETRAIN, *TINY, "--data_cache_dir", data_cache, "--output_dir", str(output_dir), *args]


def run(config: str | None, output_dir: Path, data_cache: str, args: list[str] = (), processes: int = 2,
        env: dict | None = None) -> str:
    """Run the trainer to the end; its output (stdout and stderr, in order)."""
    result = subprocess.run(launch_command(config, output_dir, data_cache, args, processes), cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    assert result.returncode == 0, f"pretrain failed ({result.returncode}):\n{result.stdout[-5000:]}"
    return result.stdout


def losses(output_dir: Path) -> dict[tuple[str, int], float]:
    """(metric, step) -> value of every training and validation loss in log_history.jsonl."""
    records = [json.loads(line) for line in (output_dir / "log_history.jsonl").read_text().splitlines()]
    return {(key, record["step"]): record[key] for record in records for key in ("train/loss", "val/loss")
            if key in record}


def assert_same_losses(expected: dict, actual: dict, tolerance: float) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, abs=tolerance), key


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, data_cache) -> tuple[Path, str]:
    """The reference: DDP over 2 processes (cpu.yaml)."""
    output_dir = tmp_path_factory.mktemp("ddp")
    return output_dir, run("cpu.yaml", output_dir, data_cache)


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory, data_cache) -> tuple[Path, str]:
    """FSDP2 over 2 processes (fsdp_cpu.yaml)."""
    output_dir = tmp_path_factory.mktemp("fsdp")
    return output_dir, run("fsdp_cpu.yaml", output_dir, data_cache)


def test_fsdp_shards_and_trains_as_ddp_does(ddp, fsdp):
    (ddp_dir, ddp_log), (fsdp_dir, fsdp_log) = ddp, fsdp
    assert ddp_log.splitlines()[0] == "DDP, 2 processes"  # the first line names the parallelism
    assert fsdp_log.splitlines()[0] == "FSDP2, 2 processes, parameters sharded"
    assert_same_losses(losses(ddp_dir), losses(fsdp_dir), 1e-4)
    # The same checkpoint files, gathered in the same layout (weights by name, each tied tensor once; the
    # optimizer's state by parameter index), so that either resumes under the other.
    for step_dir in ("checkpoint_0", "checkpoint_1"):
        ddp_checkpoint, fsdp_checkpoint = ddp_dir / "checkpoints" / step_dir, fsdp_dir / "checkpoints" / step_dir
        assert sorted(os.listdir(fsdp_checkpoint)) == sorted(os.listdir(ddp_checkpoint))
        ddp_weights, fsdp_weights = (load_file(path / "model.safetensors")
                                     for path in (ddp_checkpoint, fsdp_checkpoint))
        assert fsdp_weights.keys() == ddp_weights.keys()
        for name, tensor in ddp_weights.items():
            torch.testing.assert_close(fsdp_weights[name], tensor, atol=1e-4, rtol=0)
        ddp_state, fsdp_state = (torch.load(path / "optimizer.bin", weights_only=True)
                                 for path in (ddp_checkpoint, fsdp_checkpoint))
        assert [group["params"] for group in fsdp_state["param_groups"]] == \
            [group["params"] for group in ddp_state["param_groups"]]
        for index, values in ddp_state["state"].items():
            for key, value in values.items():
                torch.testing.assert_close(fsdp_state["state"][index][key], value, atol=1e-4, rtol=0)
    # The export is the model's own folder (its code files, not torch's FSDP classes), with the gathered weights.
    exported = sorted(os.listdir(fsdp_dir / "model"))
    assert exported == sorted(os.listdir(ddp_dir / "model"))
    config = json.loads((fsdp_dir / "model" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_backpack_gpt2.BackpackGPT2LMHeadModel"
    fsdp_export, ddp_export = load_file(fsdp_dir / "model" / "model.safetensors"), \
        load_file(ddp_dir / "model" / "model.safetensors")
    assert fsdp_export.keys() == ddp_export.keys()


def test_an_fsdp_run_resumes_exactly(fsdp, tmp_path, data_cache):
    """Stopped after step 3 and resumed: the steps after it equal the uninterrupted FSDP run's."""
    run("fsdp_cpu.yaml", tmp_path, data_cache, ["--stop_at_step", "3"])
    log = run("fsdp_cpu.yaml", tmp_path, data_cache, ["--resume", "latest"])
    assert "Resumed from" in log and "at step 3" in log
    assert_same_losses(losses(fsdp[0]), losses(tmp_path), 1e-5)


def test_an_fsdp_checkpoint_resumes_on_one_process(fsdp, tmp_path, data_cache):
    """The step-3 checkpoint of the FSDP run, resumed on one process (gathered files: any process count reads
    them), continues it exactly."""
    checkpoint = fsdp[0] / "checkpoints" / "checkpoint_0"
    assert json.loads((checkpoint / "training_state.json").read_text())["step"] == 3
    log = run(None, tmp_path, data_cache, ["--resume", str(checkpoint)], processes=1)
    assert log.splitlines()[0] == "1 process"
    expected = {key: value for key, value in losses(fsdp[0]).items() if key[1] > 3}
    resumed = {key: value for key, value in losses(tmp_path).items() if key[1] > 3}
    assert_same_losses(expected, resumed, 1e-5)


def assert_compiled_once(log: str) -> None:
    """One graph per compiled function (no graph break: fullgraph would fail the run), and nothing compiles
    again after the step-3 validation: the later steps and validations reuse the graphs."""
    assert "Graph break" not in log
    assert "Recompiling function" in log  # the logging works: training after the first validation recompiles
    later = log[log.index("step 3: validation loss"):]
    assert not re.search(r"\[rank0\].*Recompiling function", later), later[:3000]


@pytest.mark.parametrize("config", ["cpu.yaml", "fsdp_cpu.yaml"])
def test_compiled_training_under_ddp_and_fsdp_equals_eager(config, ddp, fsdp, tmp_path, data_cache):
    log = run(config, tmp_path, data_cache, ["--compile", "true"], env=COMPILED)
    assert_compiled_once(log)
    eager = ddp if config == "cpu.yaml" else fsdp
    assert_same_losses(losses(eager[0]), losses(tmp_path), 2e-3)


def test_two_machines_of_one_process_equal_one_machine_of_two(ddp, tmp_path, data_cache):
    """The README's several-machines recipe on loopback: the same command on each machine, with its
    --machine_rank, the rank-0 machine's address and port, and one shared output folder (rank 0 writes)."""
    port = str(free_port())
    machines = [subprocess.Popen(
        launch_command("cpu.yaml", tmp_path, data_cache, processes=2,
                       machine=["--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                                "--main_process_port", port]),
        cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}) for rank in (0, 1)]
    outputs = [machine.communicate(timeout=600)[0] for machine in machines]
    for machine, output in zip(machines, outputs):
        assert machine.returncode == 0, output[-4000:]
    assert outputs[0].splitlines()[0] == "DDP, 2 processes on 2 machines"
    assert losses(tmp_path) == losses(ddp[0])  # exactly


def test_fsdp_settings_the_trainer_does_not_apply_are_refused(monkeypatch):
    launched = SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_CPU)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ParallelismError, match="fsdp_version: 2"):
        consume_fsdp_request(launched)
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(ParallelismError, match="fsdp_offload_params"):
        consume_fsdp_request(launched)
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "false")
    plan = consume_fsdp_request(launched)
    assert plan.describe() == "FSDP2, 2 processes, parameters sharded"
    assert "ACCELERATE_USE_FSDP" not in os.environ  # Accelerate then never wraps the model in DDP itself


def test_an_fsdp_plan_with_an_unsharded_model_is_refused():
    """Never a silent fallback: a model that FSDP did not shard (or several processes without DDP) stops the run."""
    model = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="not sharded"):
        check_parallelism(model, Parallelism("fsdp", 2))
    with pytest.raises(RuntimeError, match="not wrapped in DDP"):
        check_parallelism(model, Parallelism("ddp", 2))
    check_parallelism(model, Parallelism("single", 1))
