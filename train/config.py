"""Training configuration: dataclasses of every key, YAML config files, and command-line overrides.

A run is described by flat keys (``n_embd``, ``learning_rate``, ``dataset`` ...). Their defaults are the paper's
recipe (AdamW, peak lr 6e-4, 5,000 warm-up steps then linear decay to zero, 100,000 steps of ~524,288 tokens);
``--config train/configs/<name>.yaml`` replaces some of them, and ``--key value`` on the command line replaces
any of them again. Parsing is ``transformers.HfArgumentParser`` over the dataclasses below.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

import yaml
from transformers import HfArgumentParser

from configuration_backpack_gpt2 import MODEL_SIZES

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


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
    vocab_size: int = field(default=50264, metadata={"help": "GPT-2's 50,257 subwords padded to a multiple of 8."})
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
    """Read a config file (a name in train/configs/ or a path) into a flat dict, checking its keys."""
    if not os.path.exists(path) and os.path.exists(os.path.join(CONFIG_DIR, f"{path}.yaml")):
        path = os.path.join(CONFIG_DIR, f"{path}.yaml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path} (choose one of {available_configs()} or a path)")
    with open(path) as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values")
    return values


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
    if config_path is not None:
        values = _yaml_values(config_path)
        known = {f.name for cls in dataclass_types for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown key(s) in {config_path}: {', '.join(unknown)}")
        parser.set_defaults(**values)
    *parsed, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    parsed = tuple(args for args in parsed if isinstance(args, dataclass_types))  # drop the --config namespace
    for args in parsed:
        if isinstance(args, TrainArguments):
            if args.model == "gpt2" and not given_on_command_line(argv, "output_dir"):
                args.output_dir += "-gpt2"  # never the Backpack's folder of the same config
            apply_size(args)
            validate_train_args(args)
    return parsed


def given_on_command_line(argv: list[str], key: str) -> bool:
    """Whether ``--key`` (or ``--key=value``, or the ``--key-with-dashes`` spelling) is among ``argv``."""
    spellings = {f"--{key}", f"--{key.replace('_', '-')}"}
    return any(arg.split("=", 1)[0] in spellings for arg in argv)


def apply_size(args: TrainArguments) -> None:
    """Fill the shape keys not given (in the config file or on the command line) from ``MODEL_SIZES[args.size]``."""
    if args.size not in MODEL_SIZES:
        raise ValueError(f"unknown size {args.size!r}; choose one of {', '.join(MODEL_SIZES)}")
    for key, value in MODEL_SIZES[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def validate_train_args(args: TrainArguments) -> None:
    """Reject inconsistent settings before any data or model is touched."""
    positive = ("n_embd", "n_layer", "n_head", "n_positions", "num_senses", "max_steps", "batch_size",
                "tokens_per_step", "eval_interval", "log_interval", "save_interval")
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup_steps < 0 or args.learning_rate <= 0:
        raise ValueError("warmup_steps must be >= 0 and learning_rate > 0")
    for name in ("stop_at_step", "eval_batches"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(args, name)}")
    if args.save_total_limit is not None and args.save_total_limit < 1:
        raise ValueError(f"save_total_limit must be >= 1 (or None: keep all), got {args.save_total_limit}")
    if args.model == "backpack" and args.n_embd % args.num_senses:
        raise ValueError(f"n_embd ({args.n_embd}) must be divisible by num_senses ({args.num_senses})")
    if args.n_embd % args.n_head:
        raise ValueError(f"n_embd ({args.n_embd}) must be divisible by n_head ({args.n_head})")


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
    """Micro-batches per optimizer step so that one step sees about ``tokens_per_step`` tokens."""
    if args.gradient_accumulation_steps is not None:
        return args.gradient_accumulation_steps
    tokens_per_micro_step = args.batch_size * args.n_positions * num_processes
    return max(1, round(args.tokens_per_step / tokens_per_micro_step))


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
