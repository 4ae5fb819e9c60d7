"""Every command in README.md is run: by `.ci/run`, by a named test, or here.

The commands are the lines of the README's ```bash blocks (a trailing backslash continues a line, `#` starts a
comment) and the `$ ` lines of its output blocks. Each one is

* a line of `.ci/run` (the same words; `exits_with N` before it: it must stop with status N). CI runs them on a
  fresh clone after the quickstart, on the models the quickstart made: installs, the toolkit, evaluation,
  publishing up to the point where a Hub token is needed, the benchmark's smoke test;
* or the quickstart's own trainer command (`RUN_BY_QUICKSTART`), which CI runs through the quickstart;
* or run by the test named in `RUN_ELSEWHERE` (the Hub commands against an offline Hub cache or a stand-in Hub);
* or run here (`RUN_HERE`, the demo), on a tiny Backpack where the quickstart leaves its model;
* or, when it needs a GPU, the network or longer than a test suite may take (`NEEDS_MORE`), run as far as it can
  go without them: its Accelerate config file is loaded and its arguments are parsed by the program's own parser.

A README command in none of these fails the test, so a new command comes with a way to run it.
"""

from __future__ import annotations

import re
import shlex
import urllib.request
from pathlib import Path

import pytest
from conftest import save_tiny_folder

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()

# README command -> how .ci/run runs it: the quickstart's trainer command, with the quickstart's arguments.
RUN_BY_QUICKSTART: dict[str, str] = {
    "python train/pretrain.py --config nano --overwrite_output_dir true": "bash scripts/quickstart.sh",
    "python train/pretrain.py --config nano --model gpt2 --overwrite_output_dir true":
        "bash scripts/quickstart.sh --model gpt2",
}
# README command -> the test that runs it.
RUN_ELSEWHERE: dict[str, str] = {
    "accelerate launch --config_file train/accelerate_configs/cpu.yaml train/pretrain.py --config nano --cpu true":
        "tests/test_train.py::test_two_processes_match_one_process",
    "accelerate launch --config_file train/accelerate_configs/fsdp_cpu.yaml train/pretrain.py --config nano "
    "--cpu true": "tests/test_distributed.py::test_fsdp_shards_and_trains_as_ddp_does",
    "backpack senses stanfordnlp/backpack-gpt2 bank --top 5":
        "tests/test_load_hub_id.py::test_backpack_senses_command_by_id_prints_the_golden_senses",
    "python hub_upload.py --update-code stanfordnlp/backpack-gpt2 --dry-run":
        "tests/test_hub_upload.py::test_update_code_dry_run_runs_only_the_installed_code_and_validates_it_offline",
    "python hub_upload.py --update-code stanfordnlp/backpack-gpt2":
        "tests/test_hub_upload.py::test_update_code_opens_one_pull_request_with_only_the_changed_files",
}
# Run here.
RUN_HERE = ("python demo/app.py outputs/nano/model",
            "python demo/app.py outputs/nano/model --port 7860 --host 127.0.0.1")
# README command -> what it needs that a test run has not.
NEEDS_MORE: dict[str, str] = {
    "accelerate launch --config_file train/accelerate_configs/single_gpu.yaml train/pretrain.py --config micro "
    "--dataset Skylion007/openwebtext": "a GPU and OpenWebText from the Hub",
    "python train/pretrain.py --config small --dataset Skylion007/openwebtext --push_to_hub you/backpack-small":
        "a GPU, OpenWebText and a Hub token",
    "accelerate launch --config_file train/accelerate_configs/multi_gpu.yaml --num_processes 4 train/pretrain.py "
    "--config small --dataset Skylion007/openwebtext": "4 GPUs and OpenWebText",
    "accelerate launch --config_file train/accelerate_configs/fsdp.yaml train/pretrain.py --config small "
    "--dataset Skylion007/openwebtext": "GPUs and OpenWebText",
    "accelerate launch --config_file train/accelerate_configs/multi_gpu.yaml --num_machines 2 --num_processes 16 "
    "--machine_rank 0 --main_process_ip 10.0.0.1 --main_process_port 29500 train/pretrain.py --config small "
    "--dataset Skylion007/openwebtext": "two machines of 8 GPUs (tests/test_distributed.py runs the recipe on "
    "loopback)",
    "accelerate launch train/evaluate.py --model_path outputs/small/model --dataset Skylion007/openwebtext":
        "a trained Small model and OpenWebText",
    "python bench/run.py --config micro --threads 1 --json out.json --sense-table --plot out.png":
        "8 minutes (every section runs at tiny size in tests/test_bench.py)",
}


def _normalise(line: str) -> str:
    """One command as its words (comments dropped), re-quoted the shell's way."""
    return " ".join(shlex.quote(word) for word in shlex.split(line, comments=True))


def commands_in(markdown: str) -> list[str]:
    """The shell commands of a markdown text: ```bash blocks, and `$ ` lines of other code blocks."""
    commands: list[str] = []
    language, pending = None, ""
    for line in markdown.splitlines():
        if line.startswith("```"):
            language = line[3:].strip() if language is None else None
            continue
        if language == "bash":
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            line, pending = pending + line, ""
        elif language == "" and line.startswith("$ "):
            line = line[2:]
        else:
            continue
        if _normalise(line):
            commands.append(_normalise(line))
    return list(dict.fromkeys(commands))


def ci_commands() -> set[str]:
    """The lines of .ci/run, without the `exits_with N` before a command that must stop with status N."""
    lines = {_normalise(line) for line in (REPO / ".ci" / "run").read_text().splitlines() if _normalise(line)}
    return {re.sub(r"^exits_with \d+ ", "", line) for line in lines}


def test_every_readme_command_is_run_by_ci_or_a_test():
    readme = commands_in(README)
    assert readme[:2] == ["bash scripts/quickstart.sh", "bash scripts/test.sh"]  # the first screen
    listed = set(RUN_BY_QUICKSTART) | set(RUN_ELSEWHERE) | set(RUN_HERE) | set(NEEDS_MORE)
    assert [command for command in readme if command not in ci_commands() | listed] == []
    assert listed - set(readme) == set(), "no longer in the README"
    for test in RUN_ELSEWHERE.values():
        path, name = test.split("::")
        assert f"def {name}(" in (REPO / path).read_text(), test


def test_ci_runs_the_quickstart_and_the_test_command_first():
    lines = [_normalise(line) for line in (REPO / ".ci" / "run").read_text().splitlines() if _normalise(line)]
    assert lines[2:4] == ["bash scripts/quickstart.sh", "bash scripts/test.sh"]  # after `set` and `cd`


def test_the_quickstart_runs_the_readme_trainer_commands():
    assert 'python train/pretrain.py --config nano --overwrite_output_dir true "$@"' in \
        (REPO / "scripts" / "quickstart.sh").read_text()
    for command, invocation in RUN_BY_QUICKSTART.items():
        extra = shlex.split(invocation)[2:]
        assert sorted(shlex.split(command)) == sorted(["python", "train/pretrain.py", "--config", "nano",
                                                       "--overwrite_output_dir", "true", *extra]), command
        assert invocation in ci_commands()


def test_the_quickstart_ends_with_readme_commands_on_the_model_it_made():
    """The commands it prints (its `$model` is outputs/nano/model) are README commands."""
    script = (REPO / "scripts" / "quickstart.sh").read_text()
    printed = [line.strip() for block in re.findall(r"<<NEXT\n(.*?)\nNEXT", script, re.S)
               for line in block.splitlines() if line.startswith("  ")]
    assert len(printed) >= 6
    readme = set(commands_in(README))
    for line in printed:
        assert _normalise(line.replace("$model", "outputs/nano/model")) in readme, line


def test_the_gpt2_baseline_defaults_to_its_own_folder():
    from backpack_train.config import DataArguments, TrainArguments, parse_args

    def output_dir(*argv: str) -> str:
        return parse_args((DataArguments, TrainArguments), list(argv))[1].output_dir

    assert output_dir("--config", "nano") == "outputs/nano"
    assert output_dir("--config", "nano", "--model", "gpt2") == "outputs/nano-gpt2"
    assert output_dir("--config", "nano", "--model", "gpt2", "--output_dir", "elsewhere") == "elsewhere"
    assert output_dir("--config", "nano", "--model=gpt2", "--output-dir=elsewhere") == "elsewhere"


@pytest.mark.parametrize("command", RUN_HERE)
def test_readme_demo_command_serves_the_page(command, tmp_path, monkeypatch, capsys):
    """The demo's command line as written, on a tiny Backpack where the quickstart leaves its model; the server
    starts (on a free port: the README's may be taken), answers, and is closed again."""
    from backpack_demo import app

    save_tiny_folder(tmp_path / "outputs" / "nano" / "model")
    real_launch, served = app.launch, {}

    def launch_and_close(page, host="127.0.0.1", port=None, block=True):
        served.update(host=host, port=port, block=block)
        url = real_launch(page, host, None, block=False)
        served["status"] = urllib.request.urlopen(url, timeout=60).status
        page.close()
        return url

    monkeypatch.setattr(app, "launch", launch_and_close)
    monkeypatch.chdir(tmp_path)
    status = app.main(shlex.split(command)[2:])
    output = capsys.readouterr()
    assert status == 0 and served["status"] == 200, output.err[-3000:]
    assert (served["host"], served["port"], served["block"]) == ("127.0.0.1", 7860, True)
    assert "Loading weights" not in output.out + output.err
    assert "share=True" not in output.out + output.err


@pytest.mark.parametrize("command", list(NEEDS_MORE))
def test_readme_command_that_needs_a_gpu_or_the_network_parses(command):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    argv = shlex.split(command)
    if argv[:2] == ["accelerate", "launch"]:
        launch = launch_command_parser().parse_args(argv[2:])
        if launch.config_file:
            load_config_from_file(str(REPO / launch.config_file))
        script, arguments = launch.training_script, launch.training_script_args
    else:
        assert argv[0] == "python", command
        script, arguments = argv[1], argv[2:]
    if script == "train/pretrain.py":
        from backpack_train.config import DataArguments, TrainArguments, parse_args

        assert parse_args((DataArguments, TrainArguments), arguments)[1].output_dir.startswith("outputs/")
    elif script == "train/evaluate.py":
        from backpack_train.config import DataArguments, parse_args
        from backpack_train.evaluate import EvalArguments

        parse_args((DataArguments, EvalArguments), arguments)
    elif script == "bench/run.py":
        from backpack_bench.run import parse_args as bench_args

        bench_args(arguments)
    else:
        raise AssertionError(f"no parser known for {script}")
