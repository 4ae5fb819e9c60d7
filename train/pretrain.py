"""Pretrain a Backpack GPT-2 (or the GPT-2 baseline) with Accelerate.

    python train/pretrain.py --config nano                       # one process, embedded offline corpus
    python train/pretrain.py --config nano --model gpt2           # the Transformer baseline, same loop and data
    accelerate launch --config_file train/accelerate_configs/multi_gpu.yaml --num_processes 4 \
        train/pretrain.py --config small --dataset openwebtext
    accelerate launch --config_file train/accelerate_configs/cpu.yaml train/pretrain.py --config nano --cpu true
                                                                  # 2 CPU processes (gloo); `--cpu --num_processes 2`
                                                                  # alone starts one with Accelerate 1.x
    backpack-pretrain --config nano                               # the same, as the installed console script

The package must be installed (`pip install -e '.[train]'`): this folder is the `backpack_train` package. Any key
of train/config.py can follow as ``--key value``; ``--resume latest`` continues a run exactly, on any number of
processes, with the checkpoint's settings except those the command gives (each change is one printed line).
Exit status: 0 done (or stopped by a first SIGTERM / Ctrl-C after saving), 1 a clear error (non-finite loss, a
failed save, a bad checkpoint, a used output folder or one another trainer holds), 2 a bad input named in one
line (a setting's type or range, a config or data file; another model shape at resume), 128 + N a second signal N.
"""

from __future__ import annotations

import json
import os
import sys
import time

from accelerate import PartialState
from accelerate.utils import set_seed

from backpack.checkpoints import CheckpointError, checkpoint_settings
from backpack.tokenizer import gpt2_tokenizer
from backpack_train import faults
from backpack_train.checkpointing import ResumePoint, describe_newest, find_resume_point
from backpack_train.config import (
    DataArguments,
    InputError,
    SettingsError,
    TrainArguments,
    apply_checkpoint_settings,
    as_dict,
    explicit_keys,
    final_step,
    gradient_accumulation_steps,
    parse_args,
    shorten_warmup,
    validate_train_args,
)
from backpack_train.data import check_data_source, prepare_datasets
from backpack_train.export import FINAL_EXPORT_DIR, export_final_model, restore_final_model
from backpack_train.interrupt import SecondSignal, StopOnSignal
from backpack_train.loop import NonFiniteLossError, build_accelerator, train, use_cpu
from backpack_train.model import build_model
from backpack_train.parallel import Parallelism, ParallelismError, consume_fsdp_request
from backpack_train.run_folder import OutputDirError, check_output_dir, clear_output_dir, locked_output_dir


def exported_step(folder: str) -> int | None:
    """The step recorded in an export's ``training_args.json`` (None: no readable record)."""
    try:
        with open(os.path.join(folder, "training_args.json"), encoding="utf-8") as handle:
            step = json.load(handle)["metrics"]["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) else None


def finish_without_training(resume: ResumePoint, args: TrainArguments, is_main_process: bool) -> dict:
    """A run whose checkpoint is already at its last step: say so, and write nothing.

    The one exception is a final export that a second signal interrupted (missing, or an earlier step's): the
    checkpoint's own export is copied there. A later step's export (another ``--resume PATH``) is left alone.
    """
    last = final_step(args)
    limit = f"--stop_at_step {args.stop_at_step}" if last != args.max_steps else f"max_steps {args.max_steps}"
    say = print if is_main_process else (lambda *_: None)
    say(f"Nothing to do: {resume.path} is at step {resume.state.step} and this run ends at step {last} ({limit}). "
        "Raise --max_steps or --stop_at_step to train further.")
    final = os.path.join(args.output_dir, FINAL_EXPORT_DIR)
    if (exported := exported_step(final)) is None or exported < resume.state.step:
        found = "missing" if not os.path.isdir(final) else f"from step {exported}"
        if is_main_process:
            restore_final_model(resume.path, args.output_dir)
        say(f"The final export {final} was {found} (stopped while writing it?): copied {resume.path}/model there.")
    return {"step": resume.state.step, "finished": True}


def main(argv: list[str] | None = None) -> dict:
    """Parse arguments, prepare data, build the model, train, export; returns the final metrics."""
    started = time.perf_counter()
    faults.install()  # the crash tests' faults (BACKPACK_FAULT), at the file module's boundary; else nothing
    argv = list(sys.argv[1:] if argv is None else argv)
    data_args, args = parse_args((DataArguments, TrainArguments), argv, description=__doc__)
    distributed = PartialState(cpu=use_cpu(args))
    plan = consume_fsdp_request(distributed)  # before any Accelerator: FSDP is train/parallel.py's
    if distributed.is_main_process:
        print(plan.describe())  # the first line: how the model is spread over the processes
    check_data_source(data_args)  # a missing, empty or binary data file fails here, before anything is built
    gradient_accumulation_steps(args, distributed.num_processes)  # a step of too many micro-batches, likewise
    with locked_output_dir(args.output_dir, distributed):  # one trainer per folder, from before the first look at it
        return run(data_args, args, explicit_keys(argv), distributed, started, plan)


def run(data_args: DataArguments, args: TrainArguments, given: set[str], distributed: PartialState,
        started: float, plan: Parallelism) -> dict:
    """:func:`main` once the output folder is this process's: resume or start, train, export."""
    say = print if distributed.is_main_process else (lambda *_: None)
    check_output_dir(args.output_dir, args.resume, args.overwrite_output_dir)
    resume, skipped = find_resume_point(args.resume, args.output_dir)
    for reason in skipped:
        say(f"warning: skipping {reason}")
    if resume is not None:  # the checkpoint's settings, but for those this command gives
        for line in apply_checkpoint_settings(data_args, args, checkpoint_settings(resume.path), given):
            say(line)
        validate_train_args(args)
        check_data_source(data_args)
    if (note := shorten_warmup(args)) is not None:
        say(f"note: {note}")
    distributed.wait_for_everyone()  # every process has looked at the folder before any writes to it
    if resume is not None and resume.state.step >= final_step(args):
        return finish_without_training(resume, args, distributed.is_main_process)
    if args.overwrite_output_dir and distributed.is_main_process:
        clear_output_dir(args.output_dir, say)
    distributed.wait_for_everyone()

    accumulation = gradient_accumulation_steps(args, distributed.num_processes)
    accelerator = build_accelerator(args, accumulation)
    run_config = as_dict(data_args, args)
    tokenizer = gpt2_tokenizer(model_max_length=args.n_positions)
    with accelerator.main_process_first():  # one process builds the data cache, the others load it
        packed = prepare_datasets(data_args, tokenizer, block_size=args.n_positions + 1)
    accelerator.print(f"data ready in {time.perf_counter() - started:.1f}s: "
                      + ", ".join(f"{split} {len(blocks):,} blocks" for split, blocks in packed.items()
                                  if hasattr(blocks, "__len__")))

    set_seed(args.seed)  # same initial weights on every process and in every run with this seed
    model = build_model(args)
    with StopOnSignal(accelerator) as stop_signal:  # also covers the final export: a second signal is reported
        model, metrics = train(args, accelerator, model, packed, tokenizer, run_config, stop_signal, resume, plan)
        metrics["wall_seconds"] = time.perf_counter() - started
        final_folder = export_final_model(accelerator, model, tokenizer, args.output_dir, run_config, metrics)
    # The DDP wrapper goes before the process group: freed after it, its reducer would be the group's last owner and
    # join gloo's threads while holding the GIL one of them may need (a hang at exit).
    del model
    accelerator.free_memory()
    accelerator.end_training()
    perplexities = [metrics[key] for key in ("start_val_perplexity", "val_perplexity") if key in metrics]
    accelerator.print(
        f"Done: {metrics['step']} steps, {metrics['tokens_per_second']:,.0f} tokens/s, validation perplexity "
        f"{' -> '.join(f'{value:.2f}' for value in perplexities) or 'not measured'}, wall time "
        f"{metrics['wall_seconds']:.0f}s. Model: {final_folder}"
    )
    return metrics


def _output_dir(argv: list[str] | None) -> str | None:
    """--output_dir as parsed, for messages after a failure (None when the arguments do not parse)."""
    try:
        return parse_args((DataArguments, TrainArguments), argv)[1].output_dir
    except (SystemExit, Exception):
        return None


def cli(argv: list[str] | None = None) -> int:
    """Run :func:`main`, turning the failures a user can act on into one message; returns the exit status."""
    try:
        main(argv)
    except SecondSignal as stop:
        output_dir = _output_dir(argv)
        where = f" {describe_newest(output_dir)}" if output_dir else ""
        print(f"error: {stop.signal_name} again while stopping: stopped at once (a save or export under way is "
              f"abandoned; nothing half-written is left under a final name).{where} --resume latest continues from "
              "there (and writes the final export if that checkpoint is the last step).", file=sys.stderr)
        return 128 + stop.signal_number
    except (NonFiniteLossError, CheckpointError, OutputDirError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (InputError, SettingsError, ParallelismError) as error:  # named in one line, before any model is built
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
