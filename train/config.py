"""Training configuration: dataclasses of every key, YAML config files, and command-line overrides.

A run is described by flat keys (``n_embd``, ``learning_rate``, ``dataset`` ...). Their defaults are the paper's
recipe (AdamW, peak lr 6e-4, 5,000 warm-up steps then linear decay to zero, 100,000 steps of ~524,288 tokens);
``--config train/configs/<name>.yaml`` replaces some of them, and ``--key value`` on the command line replaces
any of them again. Parsing is ``transformers.HfArgumentParser`` over the dataclasses below.
"""

from __future__ import annotations

import math
import os
import sys
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

import yaml
from transformers import HfArgumentParser

from configuration_backpack_gpt2 import GPT2_PADDED_VOCAB_SIZE, MODEL_SIZES, check_shape

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
# Most micro-batches one optimizer step may accumulate: far beyond any recipe (the paper's 524,288 tokens are 128
# micro-batches of 8 x 512), small enough that a step ends and a stop request is honoured within it.
MAX_GRADIENT_ACCUMULATION = 65_536


class InputError(Exception):
    """A bad input (a setting, a config file, a data file) that the message names with what was expected; the
    command lines print it as one line and exit with status 2, before any model is built."""


class ConfigError(InputError, ValueError):
    """A setting that can't be used: wrong type, out of range, unknown key, unreadable config file.

    ``key``: the setting at fault, when there is one (a config file's value is then named with the file).
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class ConfigFileNotFound(InputError, FileNotFoundError):
    """``--config`` names neither a file nor one of train/configs/."""


@dataclass
class DataArguments:
    """Where the text comes from and how it is tokenised, packed, split and cached."""

    dataset: str | None = field(
        default=None,
        metadata={"help": "Hub dataset name (e.g. openwebtext) or local dataset folder. Neither this nor "
                  "--data_files: the embedded offline corpus (gensim's Wikipedia sample + Lee news corpus)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of --dataset."})
    data_files: list[str] | None = field(
        default=None, metadata={"help": "Local .txt / .jsonl / .json / .parquet files (globs allowed)."}
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the documents' text."})
    text_sample_by: Literal["paragraph", "document", "line"] = field(
        default="paragraph", metadata={"help": "What one document is in a .txt file."}
    )
    streaming: bool = field(default=False, metadata={"help": "Stream --dataset instead of downloading it."})
    validation_fraction: float = field(
        default=0.05, metadata={"help": "Share of documents held out when the source has no validation split."}
    )
    validation_documents: int = field(
        default=1000, metadata={"help": "Documents held out from a streamed dataset with no validation split."}
    )
    max_documents: int | None = field(default=None, metadata={"help": "Use only the first N training documents."})
    num_proc: int | None = field(default=None, metadata={"help": "Processes for Dataset.map (default: CPU count)."})
    data_cache_dir: str = field(
        default=os.path.join("~", ".cache", "backpack", "pretrain-data"),
        metadata={"help": "Where tokenised, packed datasets are kept so later runs start at once."},
    )
    data_seed: int = field(default=1111, metadata={"help": "Seed of the train/validation document split."})


@dataclass
class TrainArguments:
    """Model shape, optimisation recipe, loop, checkpointing and logging."""

    # --- model ---
    model: Literal["backpack", "gpt2"] = field(
        default="backpack", metadata={"help": "backpack, or gpt2: the plain Transformer of the same size."}
    )
    size: str = field(
        default="small",
        metadata={"help": f"A named size ({', '.join(MODEL_SIZES)}): sets n_embd, n_layer, n_head and n_positions, "
                  "each unless given."},
    )
    n_embd: int | None = None
    n_layer: int | None = None
    n_head: int | None = None
    n_positions: int | None = None
    num_senses: int = 16
    sense_intermediate_scale: int = 4
    vocab_size: int = field(default=GPT2_PADDED_VOCAB_SIZE,
                            metadata={"help": "GPT-2's 50,257 subwords padded to a multiple of 8."})
    dropout: float = field(default=0.1, metadata={"help": "Embedding, residual and attention dropout."})
    # --- optimisation (the paper's recipe) ---
    max_steps: int = 100_000
    learning_rate: float = 6e-4
    warmup_steps: int = 5000
    lr_scheduler: str = field(default="linear", metadata={"help": "Any transformers.get_scheduler name."})
    weight_decay: float = field(default=0.1, metadata={"help": "Not applied to biases and LayerNorm weights."})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    tokens_per_step: int = field(
        default=524_288, metadata={"help": "Tokens per optimizer step, reached by gradient accumulation."}
    )
    batch_size: int = field(default=8, metadata={"help": "Sequences per device per forward pass."})
    gradient_accumulation_steps: int | None = field(
        default=None, metadata={"help": "Overrides the value derived from tokens_per_step."}
    )
    seed: int = 1111
    mixed_precision: Literal["no", "bf16", "fp16"] | None = field(
        default=None, metadata={"help": "Default: whatever `accelerate launch` / its config says."}
    )
    cpu: bool = field(
        default=False, metadata={"help": "Train on CPU even where a GPU is available (implied when none is)."}
    )
    gradient_checkpointing: bool = False
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (Accelerate's dynamo backend)."})
    distinct_word_senses: bool = field(
        default=True,
        metadata={"help": "Backpack: run the sense network once per distinct word of each optimizer step (its "
                  "dropout then draws one mask per word and step) instead of once per token; false reproduces the "
                  "paper's per-token training exactly."},
    )
    # --- evaluation, logging, checkpoints ---
    eval_interval: int = field(default=1000, metadata={"help": "Validate every N steps (and at start and end)."})
    eval_batches: int | None = field(
        default=100,
        metadata={"help": "Validation batches per evaluation, all processes together (None: all; 0: no validation, "
                  "and no validation metric is recorded)."},
    )
    log_interval: int = 10
    save_interval: int = 5000
    save_total_limit: int | None = field(
        default=3,
        metadata={"help": "Complete checkpoints kept; older ones are removed once a new one is complete (None: all)."},
    )
    output_dir: str = field(
        default="outputs/backpack",
        metadata={"help": "Where the run writes (default: the config's folder; with --model gpt2 and no "
                  "--output_dir, that folder with -gpt2 appended, e.g. outputs/nano-gpt2)."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start over in an output folder that holds a run: remove its checkpoints/, model/, logs/ "
                  "and log_history.jsonl first. Without it (or --resume) such a folder is refused."},
    )
    resume: str | None = field(
        default=None,
        metadata={"help": "'latest' (the newest complete checkpoint of --output_dir) or a checkpoint folder."},
    )
    stop_at_step: int | None = field(
        default=None,
        metadata={"help": "Save and stop after this step without changing the schedule (jobs split in chunks); "
                  "0 saves the initial state and stops."},
    )
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard, wandb, all or none."})
    run_name: str = "pretrain"
    push_to_hub: str | None = field(
        default=None, metadata={"help": "OWNER/NAME: publish every saved export there (hub_upload.py, main process)."}
    )
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repo private."})
    hub_dry_run: bool = field(default=False, metadata={"help": "Stage and validate each push, but send nothing."})


def _yaml_values(path: str) -> dict:
    """Read a config file (a name in train/configs/ or a path) into a flat dict (keys and types: `check_values`)."""
    if not os.path.exists(path) and os.path.exists(os.path.join(CONFIG_DIR, f"{path}.yaml")):
        path = os.path.join(CONFIG_DIR, f"{path}.yaml")
    if os.path.isdir(path):
        raise ConfigError(f"--config {path} is a folder; expected a YAML file or one of {available_configs()}")
    if not os.path.isfile(path):
        raise ConfigFileNotFound(f"config file not found: {path} (choose one of {available_configs()} or a path)")
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle)
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"can't read config file {path}: {error}") from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from error
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, not a "
                          f"{type(values).__name__}")
    return values


def _describe(value) -> str:
    kind = {bool: "a boolean", str: "a string", float: "a number", int: "an integer", list: "a list",
            dict: "a mapping", type(None): "null"}.get(type(value), type(value).__name__)
    return f"{value!r} ({kind})"


def _expected(annotation) -> str:
    """How a type reads in a message: ``an integer``, ``one of backpack, gpt2``, ``a list of strings or null``."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [_expected(arg) for arg in args if arg is not type(None)]
        return " or ".join(options) + (" or null" if type(None) in args else "")
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(str(arg) for arg in args)
    if typing.get_origin(annotation) is list:
        return f"a list of {_expected(args[0]).removeprefix('a ')}s"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[annotation]


def _convert(value, annotation):
    """``value`` as ``annotation`` (a YAML number for a float, ``6e-4`` that YAML reads as text); TypeError if not."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _convert(value, arg)
                except TypeError:
                    pass
        raise TypeError
    if origin is Literal:
        if value in args and type(value) is type(args[args.index(value)]):
            return value
        raise TypeError
    if origin is list:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise TypeError
        return [_convert(item, args[0]) for item in items]
    if annotation is bool and type(value) is bool:
        return value
    if annotation is int and type(value) is int:
        return value
    if annotation is float and type(value) in (int, float, str):
        try:
            return float(value)
        except ValueError:
            raise TypeError from None
    if annotation is str and type(value) is str:
        return value
    raise TypeError


def check_values(values: dict, dataclass_types: tuple[type, ...], where: str) -> dict:
    """The config file's values, each checked against its key's type; unknown keys refused.

    Raises:
        ConfigError: naming the file, the key, what was given and what is expected, e.g.
            ``nano.yaml: batch_size must be an integer, got 1.5 (a number)``.
    """
    hints = {name: hint for cls in dataclass_types for name, hint in typing.get_type_hints(cls).items()}
    unknown = sorted(str(key) for key in values if key not in hints)
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)}")
    checked = {}
    for key, value in values.items():
        try:
            checked[key] = _convert(value, hints[key])
        except TypeError:
            raise ConfigError(f"{where}: {key} must be {_expected(hints[key])}, got {_describe(value)}") from None
    return checked


def available_configs() -> list[str]:
    """Names of the YAML configs shipped in train/configs/."""
    return sorted(name[: -len(".yaml")] for name in os.listdir(CONFIG_DIR) if name.endswith(".yaml"))


def parse_args(
    dataclass_types: tuple[type, ...], argv: list[str] | None = None, description: str | None = None
) -> tuple:
    """Parse ``[--config FILE] [--key value ...]`` into instances of ``dataclass_types``.

    The YAML file's values become the parser's defaults, so anything on the command line wins over them;
    an unknown key in either place is an error that names it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types, description=description)
    parser.add_argument("--config", default=None, help=f"YAML file or one of: {', '.join(available_configs())}")
    config_path = parser.parse_known_args(argv)[0].config
    from_file: dict = {}
    if config_path is not None:
        # The parser's defaults skip its type conversion: a YAML value is checked here (batch_size: 1.5 would
        # otherwise reach the DataLoader).
        from_file = check_values(_yaml_values(config_path), dataclass_types, config_path)
        parser.set_defaults(**from_file)
    *parsed, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    parsed = tuple(args for args in parsed if isinstance(args, dataclass_types))  # drop the --config namespace
    try:
        _validate(parsed, argv)
    except ConfigError as error:  # a value of the config file (not overridden on the command line): name the file
        if error.key in from_file and not given_on_command_line(argv, error.key):
            raise ConfigError(f"{config_path}: {error}", key=error.key) from None
        raise
    return parsed


def _validate(parsed: tuple, argv: list[str]) -> None:
    """Fill the shape from the size, name the GPT-2 baseline's own folder, and check every range."""
    for args in parsed:
        if isinstance(args, TrainArguments):
            if args.model == "gpt2" and not given_on_command_line(argv, "output_dir"):
                args.output_dir += "-gpt2"  # never the Backpack's folder of the same config
            apply_size(args)
            validate_train_args(args)
        if isinstance(args, DataArguments):
            validate_data_args(args)


def given_on_command_line(argv: list[str], key: str) -> bool:
    """Whether ``--key`` (or ``--key=value``, or the ``--key-with-dashes`` spelling) is among ``argv``."""
    spellings = {f"--{key}", f"--{key.replace('_', '-')}"}
    return any(arg.split("=", 1)[0] in spellings for arg in argv)


def apply_size(args: TrainArguments) -> None:
    """Fill the shape keys not given (in the config file or on the command line) from ``MODEL_SIZES[args.size]``."""
    if args.size not in MODEL_SIZES:
        raise ConfigError(f"unknown size {args.size!r}; choose one of {', '.join(MODEL_SIZES)}", key="size")
    for key, value in MODEL_SIZES[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def _at_least(args, names: tuple[str, ...], minimum: int, optional: str = "") -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ConfigError(f"{name} must be >= {minimum}{optional}, got {value}", key=name)


def validate_train_args(args: TrainArguments) -> None:
    """Reject out-of-range and inconsistent settings before any data or model is touched (``ConfigError``)."""
    _at_least(args, ("n_embd", "n_layer", "n_head", "n_positions", "num_senses", "sense_intermediate_scale",
                     "vocab_size", "max_steps", "batch_size", "tokens_per_step", "eval_interval", "log_interval",
                     "save_interval"), 1)
    _at_least(args, ("gradient_accumulation_steps", "save_total_limit"), 1, " (or null)")
    _at_least(args, ("warmup_steps",), 0)
    _at_least(args, ("stop_at_step", "eval_batches"), 0, " (or null)")
    floats = {"learning_rate": (0, None), "adam_epsilon": (0, None), "max_grad_norm": (0, None),
              "weight_decay": (0, None), "dropout": (0, 1), "adam_beta1": (0, 1), "adam_beta2": (0, 1)}
    for name, (low, high) in floats.items():
        value = getattr(args, name)
        strict = name in ("learning_rate", "adam_epsilon", "max_grad_norm")
        if not math.isfinite(value) or value < low or (strict and value == low) or (high is not None
                                                                                    and value >= high):
            bound = f"> {low}" if strict else f">= {low}"
            raise ConfigError(f"{name} must be a finite number {bound}{f' and < {high}' if high else ''}, "
                              f"got {value}", key=name)
    if args.gradient_accumulation_steps is not None and args.gradient_accumulation_steps > MAX_GRADIENT_ACCUMULATION:
        raise ConfigError(f"gradient_accumulation_steps {args.gradient_accumulation_steps:,} is more than "
                          f"{MAX_GRADIENT_ACCUMULATION:,} micro-batches per optimizer step",
                          key="gradient_accumulation_steps")
    try:
        check_shape(args.n_embd, args.n_head, args.num_senses if args.model == "backpack" else None)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def validate_data_args(args: DataArguments) -> None:
    """Reject out-of-range data settings (``ConfigError``); the files themselves: ``check_data_source``."""
    _at_least(args, ("validation_documents",), 1)
    _at_least(args, ("max_documents", "num_proc"), 1, " (or null)")
    if not 0 < args.validation_fraction < 1:
        raise ConfigError(f"validation_fraction must be in (0, 1), got {args.validation_fraction}",
                          key="validation_fraction")


def final_step(args: TrainArguments) -> int:
    """The step this invocation stops at: ``max_steps``, or ``stop_at_step`` when that comes first (0 included)."""
    return args.max_steps if args.stop_at_step is None else min(args.max_steps, args.stop_at_step)


def shorten_warmup(args: TrainArguments) -> str | None:
    """Scale the warm-up down when it would not end before ``max_steps``; returns a note saying so, or None.

    With ``warmup_steps >= max_steps`` the learning rate never reaches its peak and never decays: a short run
    (``--max_steps 10`` with the nano config's 12 warm-up steps) would train at a fraction of the rate it asked
    for. The warm-up becomes 10% of ``max_steps`` (at least 1 step), as in the paper's recipe (5,000 of 100,000
    steps is 5%; 10% gives short runs a gentler start; below 10 steps there is no warm-up).
    """
    if args.warmup_steps < args.max_steps:
        return None
    requested, args.warmup_steps = args.warmup_steps, args.max_steps // 10
    return (f"warmup_steps {requested} >= max_steps {args.max_steps}: the learning rate would never reach its peak; "
            f"using {args.warmup_steps} warm-up step(s) instead (10% of max_steps)")


def gradient_accumulation_steps(args: TrainArguments, num_processes: int) -> int:
    """Micro-batches per optimizer step so that one step sees about ``tokens_per_step`` tokens.

    Raises:
        ConfigError: more than ``MAX_GRADIENT_ACCUMULATION`` of them (``--tokens_per_step 1e15`` would make a step
            that never ends, and a stop request waits for the end of a step).
    """
    if args.gradient_accumulation_steps is not None:
        return args.gradient_accumulation_steps
    tokens_per_micro_step = args.batch_size * args.n_positions * num_processes
    steps = max(1, round(args.tokens_per_step / tokens_per_micro_step))
    if steps > MAX_GRADIENT_ACCUMULATION:
        raise ConfigError(
            f"tokens_per_step {args.tokens_per_step:,} takes {steps:,} micro-batches of {tokens_per_micro_step:,} "
            f"tokens (batch_size {args.batch_size} x n_positions {args.n_positions} x {num_processes} process(es)) "
            f"per optimizer step; at most {MAX_GRADIENT_ACCUMULATION:,}: lower tokens_per_step or raise batch_size")
    return steps


def as_dict(*args_objects) -> dict:
    """All keys of the given dataclass instances as one flat dict (for trackers and the export JSON)."""
    merged: dict = {}
    for args in args_objects:
        merged.update(asdict(args))
    return merged


# --- resuming: the checkpoint's settings, and what the command says on top of them ------------------------------

# What the weights fix: a checkpoint cannot continue with another value.
FIXED_AT_RESUME = ("model", "n_embd", "n_layer", "n_head", "n_positions", "num_senses", "sense_intermediate_scale",
                   "vocab_size")
# What changes the data the run sees: allowed, with a warning (the run is no longer the original one).
DATA_AT_RESUME = ("dataset", "dataset_config", "data_files", "text_column", "text_sample_by", "streaming",
                  "validation_fraction", "validation_documents", "max_documents", "data_seed")
# What belongs to one invocation, not to the run: always this command's value.
OWN_TO_INVOCATION = ("output_dir", "overwrite_output_dir", "resume", "stop_at_step", "cpu", "data_cache_dir",
                     "num_proc", "push_to_hub", "hub_private", "hub_dry_run")
_UNSET = object()


class SettingsError(ValueError):
    """A setting given at resume contradicts the checkpoint (e.g. another model shape); the message names it."""


def explicit_keys(argv: list[str], dataclass_types: tuple[type, ...] = (DataArguments, TrainArguments)) -> set[str]:
    """The keys a command sets itself, on its command line or in its ``--config`` file (not by a default).

    A ``--size`` given either way sets the shape keys too.
    """
    parser = HfArgumentParser(dataclass_types)
    parser.add_argument("--config", default=None)
    names = [f.name for cls in dataclass_types for f in fields(cls)]
    parser.set_defaults(**dict.fromkeys(names, _UNSET))
    namespace, _ = parser.parse_known_args(list(argv))
    given = {name for name in names if getattr(namespace, name, _UNSET) is not _UNSET}
    if namespace.config is not None:
        given |= set(_yaml_values(namespace.config))
    if "size" in given:
        given |= {key for shape in MODEL_SIZES.values() for key in shape}
    return given


def apply_checkpoint_settings(data_args: DataArguments, args: TrainArguments, saved: dict,
                              given: set[str]) -> list[str]:
    """Continue a run with its checkpoint's settings, except those the command gives; returns lines to print.

    ``saved`` is the checkpoint's record of its run's settings (``training_args`` of its export), ``given`` what
    the command sets itself (:func:`explicit_keys`). A key the command does not give takes the checkpoint's value,
    so ``--resume latest`` alone continues the run as it was. A key it gives wins, and a changed value is one line,
    ``learning_rate 1e-05 (checkpoint: 0.01)``; a changed seed or data source is a warning line.

    Raises:
        SettingsError: a key the weights fix (model, shape, vocabulary, senses) differs, naming each one.
    """
    lines, fixed = [], []
    for target in (args, data_args):
        for name in (f.name for f in fields(target)):
            if name in OWN_TO_INVOCATION or name not in saved:
                continue
            value, before = getattr(target, name), saved[name]
            if name not in given:
                setattr(target, name, before)
            elif value == before or name == "size":  # a size is a name for shape keys, compared one by one
                continue
            elif name in FIXED_AT_RESUME:
                fixed.append(f"{name} {value} (checkpoint: {before})")
            elif name == "seed":
                lines.append(f"warning: seed {value} (checkpoint: {before}): the data order and dropout masks differ "
                             "from the original run's from here on")
            elif name in DATA_AT_RESUME:
                lines.append(f"warning: {name} {value} (checkpoint: {before}): the run continues on other data")
            else:
                lines.append(f"{name} {value} (checkpoint: {before})")
    if fixed:
        raise SettingsError(
            f"cannot resume with {', '.join(fixed)}: the checkpoint's weights fix the model, its shape, vocabulary "
            "and senses. Leave these out (the checkpoint's values are used), or start a new run in another "
            "--output_dir."
        )
    return lines
