"""One installable project: every part imports from the installed package, one registry of model sizes, one
reader of the offline corpus, and the documented commands are the real ones."""

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from backpack.checkpoints import config_from_training_args
from backpack.corpora import wikipedia_articles
from backpack.tokenizer import gpt2_tokenizer
from backpack_bench.configs import backpack_config, gpt2_config
from backpack_bench.data import token_stream
from backpack_train.config import DataArguments, TrainArguments, as_dict, available_configs, parse_args
from backpack_train.data import embedded_documents
from backpack_train.model import model_config
from configuration_backpack_gpt2 import MODEL_SIZES

REPO = Path(__file__).resolve().parents[1]
SHAPE_KEYS = ("n_embd", "n_layer", "n_head", "n_positions")

IMPORT_EVERYTHING = textwrap.dedent(
    """
    import importlib, pkgutil
    names = ["configuration_backpack_gpt2", "modeling_backpack_gpt2", "hub_upload"]
    for package in ("backpack", "backpack_hub", "backpack_train", "backpack_bench", "backpack_demo"):
        module = importlib.import_module(package)
        names += [package] + [f"{package}.{info.name}" for info in pkgutil.iter_modules(module.__path__)
                              if info.name != "__main__"]  # that one runs the command
    for name in names:
        importlib.import_module(name)
    print("IMPORTED", len(names))
    """
)


def test_every_module_imports_from_the_installed_project(tmp_path):
    # A fresh interpreter in an unrelated folder: only what the installation provides is importable.
    result = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split("IMPORTED")[-1]) > 40


@pytest.mark.parametrize("command", ["backpack", "backpack-pretrain", "backpack-evaluate", "backpack-bench",
                                     "backpack-demo", "backpack-hub-upload"])
def test_console_scripts_are_installed(command, tmp_path):
    executable = shutil.which(command, path=os.path.dirname(sys.executable))
    assert executable is not None, f"{command} is not installed beside {sys.executable}"
    result = subprocess.run([executable, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr[-2000:]


def project_sources() -> list[Path]:
    """The project's Python files (this test, which spells the patterns out, aside)."""
    return [path for path in REPO.rglob("*.py")
            if not {".venv", ".git", "outputs", "build"} & set(path.parts) and path != Path(__file__).resolve()]


def test_no_module_edits_sys_path_or_waives_import_order_for_it():
    offenders = [f"{path.relative_to(REPO)}:{number}" for path in project_sources()
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if re.search(r"sys\.path\.(insert|append)|sys\.path\[0\]\s*=", line)]
    assert offenders == []
    waivers = [str(path.relative_to(REPO)) for path in project_sources() if "noqa: E402" in path.read_text()]
    assert waivers == ["backpack/plots.py"]  # matplotlib's backend must be chosen before pyplot is imported


# --- one source of truth ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", sorted(MODEL_SIZES))
def test_trainer_configs_benchmark_and_hub_read_one_registry_of_sizes(size):
    assert size in available_configs()
    args = next(a for a in parse_args((DataArguments, TrainArguments), ["--config", size])
                if isinstance(a, TrainArguments))
    assert {key: getattr(args, key) for key in SHAPE_KEYS} == MODEL_SIZES[size]
    config = model_config(args)
    assert {key: getattr(config, key) for key in SHAPE_KEYS} == MODEL_SIZES[size]
    # The YAML file names the size and repeats no shape key.
    text = yaml.safe_load((REPO / "train" / "configs" / f"{size}.yaml").read_text())
    assert text["size"] == size and not set(SHAPE_KEYS) & set(text)
    # The benchmark's pair is the registry's size, and its GPT-2 is the Backpack's contextualization network.
    backpack, gpt2 = backpack_config(size, MODEL_SIZES[size]["n_positions"]), gpt2_config(size)
    assert {key: getattr(backpack, key) for key in SHAPE_KEYS} == MODEL_SIZES[size]
    assert (gpt2.n_embd, gpt2.n_layer, gpt2.n_head) == (backpack.n_embd, backpack.n_layer, backpack.n_head)
    # The hub tool rebuilds a run's model from its training_args.json (no export beside it) as the trainer does.
    assert config_from_training_args(as_dict(args)).to_dict() == config.to_dict()


def test_benchmark_times_the_text_training_sees():
    first_article = next(wikipedia_articles())[1]
    assert embedded_documents()[0]["text"] == first_article
    expected = gpt2_tokenizer(model_max_length=10**9)(first_article + "\n\n")["input_ids"][:500]
    assert token_stream("wiki", 500, vocab_size=50264).tolist() == expected


# --- import graph -------------------------------------------------------------------------------------------------

# Folder -> installed package; layers from the bottom: a module imports only from its own layer or those below.
PACKAGE_FOLDERS = {"backpack": "backpack", "backpack_hub": "backpack_hub", "train": "backpack_train",
                   "bench": "backpack_bench", "demo": "backpack_demo"}
TOP_LEVEL_MODULES = ("configuration_backpack_gpt2", "modeling_backpack_gpt2", "hub_upload")
LAYERS = {"configuration_backpack_gpt2": 0, "modeling_backpack_gpt2": 0, "backpack": 1, "backpack_hub": 2,
          "hub_upload": 3, "backpack_train": 3, "backpack_bench": 4, "backpack_demo": 4}
COMMAND_LINES = {"hub_upload", "backpack_train.pretrain", "backpack.cli", "backpack.__main__"}


def project_modules() -> dict[str, Path]:
    """Every module of the project by its installed name."""
    modules = {name: REPO / f"{name}.py" for name in TOP_LEVEL_MODULES}
    for folder, package in PACKAGE_FOLDERS.items():
        for path in sorted((REPO / folder).glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file (in functions too: a lazy import is one)."""
    import ast

    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.stem == "__init__" else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{parent}.{base}" if base else parent
                # `from package import module` imports the module; `from module import name` the module
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            else:
                continue
            imported |= {target for target in targets if target in modules and target != name}
        graph[name] = imported
    return graph


def test_import_graph_has_no_cycle_and_runs_down_the_layers():
    """Model files <- backpack (toolkit) <- backpack_hub <- backpack_train (and hub_upload.py) <- bench, demo; no
    module imports a command line; no cycle of modules, counting imports inside functions."""
    graph = import_graph()
    assert "backpack.checkpoints" in graph["backpack_hub.checkpoint"] and "hub_upload" not in graph[
        "backpack_train.loop"]  # the graph sees function-level imports
    for module, imported in graph.items():
        for target in imported:
            above = LAYERS[target.split(".")[0]] > LAYERS[module.split(".")[0]]
            assert not above, f"{module} imports {target}, a layer above it"
            if module not in COMMAND_LINES:
                assert target not in COMMAND_LINES, f"{module} imports the command line {target}"
    # Depth-first search for a cycle; the path found is the message.
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            assert state.get(target) != 1, "import cycle: " + " -> ".join(path[path.index(target):] + [target])
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


# --- documented commands ------------------------------------------------------------------------------------------


def documented_commands() -> list[str]:
    """`accelerate launch` lines of the README and of train/pretrain.py's usage text."""
    texts = [(REPO / "README.md").read_text(), (REPO / "train" / "pretrain.py").read_text()]
    return [line for text in texts for line in text.splitlines() if line.lstrip().startswith("accelerate launch")]


def test_documented_launch_commands_use_real_config_files():
    commands = documented_commands()
    assert commands
    for command in commands:
        # `accelerate launch --cpu --num_processes 2` starts ONE process with Accelerate 1.x: never advertised.
        assert not re.search(r"launch --cpu --num_processes", command), command
        for path in re.findall(r"--config_file (\S+)", command):
            assert (REPO / path).is_file(), command
        for name in re.findall(r"pretrain\.py --config (\S+)", command):
            assert name in available_configs() or (REPO / name).is_file(), command


def test_run_time_of_the_main_command_is_stated_once():
    """The README measures it; the script and the config point there instead of guessing their own numbers."""
    for path in (REPO / "scripts" / "quickstart.sh", REPO / "train" / "configs" / "nano.yaml"):
        assert not re.search(r"\d+\s*minutes", path.read_text()), path
        assert "README" in path.read_text()
