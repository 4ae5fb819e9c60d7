"""The training loop. Accelerate does all device work: placement, DDP / FSDP, mixed precision, accumulation.

One optimizer step = ``gradient_accumulation_steps`` micro-batches on every process, read from the run's data order
in global units (train/data_order.py), so that any split of the same global batch over processes, batch size and
accumulation trains on the same sequences. Its loss is the mean over every target token of the step, all processes
together: each micro-batch's summed loss is divided by the step's target count (a host-side integer, summed over
processes on the CPU), so the gradient does not depend on how the step was split either.

Nothing is read back from the device in an ordinary step: the loss is read at the log interval, and a NaN / inf
loss is remembered on the device (:class:`NonFiniteWatch`) and checked whenever values are read back anyway (log
interval, validation, before every save), so a run with a bad loss stops without saving and the last checkpoint
on disk is a good one. The loop validates every ``eval_interval`` steps, saves a checkpoint
(train/checkpointing.py: complete or not at all) every ``save_interval`` steps and at the end, and stops cleanly
(with a checkpoint) when the caller's :class:`~backpack_train.interrupt.StopOnSignal` saw SIGTERM / SIGINT on any
process: all processes agree on it after every step, on the CPU.

:func:`train` reads top to bottom: :func:`setup_run` builds the run's pieces (:class:`Run`), :func:`resume_run`
loads a checkpoint into them, :func:`start_run` starts the logs, :func:`fit` is the step loop (:func:`train_step`,
:func:`log_step`, :func:`validate`, :func:`save`) and :func:`finish_run` writes the last checkpoint.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    parse_flag_from_env,
)
from tqdm.auto import tqdm
from transformers import get_scheduler

from backpack.loading import count_parameters
from backpack_train import faults
from backpack_train.checkpointing import (
    ResumePoint,
    TrainingState,
    checkpoints_root,
    describe_newest,
    load_checkpoint,
    save_checkpoint,
)
from backpack_train.config import TrainArguments, final_step
from backpack_train.data import PAD_TOKEN, make_validation_loader
from backpack_train.data_order import StepLayout, training_batches
from backpack_train.distinct_words import DistinctWordSenses, training_distinct_words
from backpack_train.export import export_model
from backpack_train.interrupt import StopOnSignal
from backpack_train.loss import evaluate, step_gradients
from backpack_train.model import build_optimizer
from backpack_train.parallel import (
    Parallelism,
    ShardedTrainingState,
    expect_graphs,
    micro_step,
    plan_of,
    prepare_for_training,
    wrap_model,
)
from backpack_train.run_folder import LogHistory


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf."""


def use_cpu(args: TrainArguments) -> bool:
    """Whether to run on CPU: asked for (``--cpu true`` or ``accelerate launch --cpu``), or no accelerator exists.

    Saying so explicitly matters for several processes: Accelerate sets up CPU (gloo) DDP only when told ``cpu``.
    """
    return args.cpu or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.accelerator.is_available()


def build_accelerator(args: TrainArguments, gradient_accumulation_steps: int) -> Accelerator:
    """The run's Accelerator: accumulation, mixed precision, trackers, seeded data order.

    Checkpoint naming and pruning are train/checkpointing.py's (Accelerate's automatic naming deletes the oldest
    checkpoint before the new one exists).
    """
    trackers = {"none": None, "all": "all"}.get(args.report_to, args.report_to.split(","))
    return Accelerator(
        cpu=use_cpu(args),
        mixed_precision=args.mixed_precision,
        # Accumulation counts micro-batches only, never the end of an epoch: every step has the same size.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=gradient_accumulation_steps, sync_with_dataloader=False
        ),
        # The scheduler is stepped once per optimizer step, whatever the number of processes.
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        log_with=trackers,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs"),
        ),
        # No dynamo plugin: --compile is train/parallel.py's, which compiles what the DDP / FSDP wrapper runs.
    )


def _tracker_config(config: dict) -> dict:
    """Trackers (TensorBoard hparams) take scalars and strings only."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in config.items()}


def publish(accelerator: Accelerator, folder: str, args: TrainArguments, step: int) -> None:
    """Push an export to the Hub from the main process; a failed push warns and training goes on."""
    if accelerator.is_main_process:
        from backpack_hub import HubUploadError, push_checkpoint  # only runs that publish need huggingface_hub's API

        try:
            push_checkpoint(folder, args.push_to_hub, private=args.hub_private, dry_run=args.hub_dry_run,
                            commit_message=f"Backpack checkpoint at step {step}", log=accelerator.print)
        except HubUploadError as error:
            accelerator.print(f"warning: push to {args.push_to_hub} failed, training goes on: {error}")
    accelerator.wait_for_everyone()



def drop_tied_aliases(accelerator: Accelerator) -> Callable[[list, list[dict], str], None]:
    """A `save_state` hook that stores each tied tensor once, under the name the model ties the others to.

    A Backpack's state dict names its word embedding three times (the published aliases); Accelerate would keep
    one name itself, warning at every save. Loading ties the aliases back (`load_state` goes through safetensors).
    """

    def hook(models: list, weights: list[dict], output_dir: str) -> None:
        for model, state in zip(models, weights):
            for alias in getattr(accelerator.unwrap_model(model), "all_tied_weights_keys", None) or {}:
                state.pop(alias, None)

    return hook


class HostSums:
    """Sums of a few integers over all processes, computed on the CPU: no device work, so no device sync.

    The default process group serves when it handles CPU tensors (gloo); under NCCL a gloo group is made once.
    """

    def __init__(self, accelerator: Accelerator):
        self.num_processes = accelerator.num_processes
        self.group = None
        if self.num_processes > 1 and "gloo" not in str(dist.get_backend()):
            self.group = dist.new_group(backend="gloo")

    def __call__(self, *values: int) -> list[int]:
        if self.num_processes == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(tensor, group=self.group)
        return tensor.tolist()


class NonFiniteWatch:
    """The first step whose loss was NaN or inf, kept on the device; reading it (a sync) is left to the caller."""

    def __init__(self, device: torch.device):
        self.first_step = torch.zeros((), dtype=torch.int64, device=device)

    def update(self, loss: torch.Tensor, step: int) -> None:
        self.first_step = torch.where((self.first_step == 0) & ~torch.isfinite(loss), step, self.first_step)

    def first(self, accelerator: Accelerator) -> int | None:
        """The first bad step of any process (None: all finite). Every process must call this."""
        steps = [step for step in accelerator.gather(self.first_step.reshape(1)).tolist() if step > 0]
        return min(steps) if steps else None


def apply_hyperparameters(optimizer, scheduler, args: TrainArguments) -> None:
    """Make a resumed optimizer and scheduler use this run's hyper-parameters, not the saving run's.

    ``load_state`` restores AdamW's parameter groups (learning rate, weight decay, betas, epsilon) and the
    scheduler's base learning rates as they were saved. The schedule's shape (kind, warm-up, ``max_steps``) is
    this run's already: the scheduler was built from ``args``, and its state holds only its position and base
    rates. Group 0 holds the matrices that decay, group 1 the rest (train/model.py's ``optimizer_groups``).
    """
    inner = getattr(scheduler, "scheduler", scheduler)
    groups = optimizer.param_groups
    for index, group in enumerate(groups):
        group.update(initial_lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                     weight_decay=args.weight_decay if index == 0 else 0.0)
    if hasattr(inner, "lr_lambdas"):  # LambdaLR: what get_scheduler builds for every schedule the loop can drive
        inner.base_lrs = [args.learning_rate] * len(groups)
        rates = [base * factor(inner.last_epoch) for base, factor in zip(inner.base_lrs, inner.lr_lambdas)]
        for group, rate in zip(groups, rates):
            group["lr"] = rate
        inner._last_lr = rates


@dataclass
class Run:
    """The pieces of one training run: built by :func:`setup_run`, read and advanced by everything after it."""

    args: TrainArguments
    accelerator: Accelerator
    plan: Parallelism
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    validation_loader: torch.utils.data.DataLoader
    layout: StepLayout
    sharded: ShardedTrainingState | None
    history: LogHistory
    watch: NonFiniteWatch
    tokenizer: Any
    run_config: dict
    state: TrainingState = field(default_factory=TrainingState)
    metrics: dict = field(default_factory=dict)
    progress: tqdm | None = None

    @property
    def sequences_per_step(self) -> int:
        return self.layout.sequences_per_step

    @property
    def tokens_per_step(self) -> int:
        return self.layout.sequences_per_step * self.args.n_positions


def train(args: TrainArguments, accelerator: Accelerator, model, packed, tokenizer, run_config: dict,
          stop_signal: StopOnSignal, resume: ResumePoint | None = None, plan: Parallelism | None = None) -> tuple:
    """Train ``model`` on the packed splits from ``resume`` (or from scratch); returns the prepared model and the
    final metrics. ``plan`` is the run's parallelism (train/parallel.py; default: one process or DDP, as launched).

    Every checkpoint also gets an exported HF folder (``checkpoint_<i>/model``). ``stop_signal`` (entered by the
    caller, so that it also covers the final export) turns a first SIGTERM / SIGINT into a save and a stop. The
    caller ends the run with ``accelerator.end_training()`` once it is done.
    """
    run = setup_run(args, accelerator, model, packed, tokenizer, run_config, plan or plan_of(accelerator))
    resume_run(run, resume)
    start_run(run)
    stop_reason = fit(run, packed["train"], stop_signal)
    finish_run(run, stop_reason)
    return run.model, run.metrics


def setup_run(args: TrainArguments, accelerator: Accelerator, model, packed, tokenizer, run_config: dict,
              plan: Parallelism) -> Run:
    """Wrap and prepare the model, optimizer, scheduler and validation loader; the run starts at step 0."""
    model.train()
    model = wrap_model(accelerator, model, plan, args.compile)  # FSDP: sharded here, before the optimizer sees it
    optimizer = build_optimizer(model, args)
    scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.warmup_steps,
                              num_training_steps=args.max_steps)
    validation_loader = make_validation_loader(packed, args.batch_size)
    model, optimizer, validation_loader, scheduler = prepare_for_training(
        accelerator, plan, args.compile, model, optimizer, validation_loader, scheduler
    )
    sharded = ShardedTrainingState(accelerator, model, optimizer) if plan.sharded else None
    accelerator.register_save_state_pre_hook(drop_tied_aliases(accelerator))
    layout = StepLayout(accelerator.num_processes, accelerator.process_index, args.batch_size,
                        accelerator.gradient_accumulation_steps)
    return Run(args, accelerator, plan, model, optimizer, scheduler, validation_loader, layout, sharded,
               history=LogHistory(accelerator, args.output_dir), watch=NonFiniteWatch(accelerator.device),
               tokenizer=tokenizer, run_config=run_config)


def resume_run(run: Run, resume: ResumePoint | None) -> None:
    """Load ``resume`` (weights, optimizer, scheduler, generators, data position) with this run's
    hyper-parameters, or say that ``--resume latest`` found nothing; any ``--resume`` drops the log records of the
    steps this run logs again."""
    accelerator, args = run.accelerator, run.args
    if resume is not None:
        run.state = load_checkpoint(accelerator, resume, run.sharded)
        apply_hyperparameters(run.optimizer, run.scheduler, args)
        accelerator.print(f"Resumed from {resume.path} at step {run.state.step} (sequence {run.state.sequences:,} "
                          "of the data order)")
        if run.state.sequences_per_step not in (0, run.sequences_per_step):
            accelerator.print(
                f"global batch {run.sequences_per_step} sequences ({run.tokens_per_step:,} tokens) per step "
                f"(checkpoint: {run.state.sequences_per_step}): the run continues from sequence "
                f"{run.state.sequences:,} of the data order with the new batch")
    elif args.resume == "latest":
        accelerator.print(f"No checkpoint in {checkpoints_root(args.output_dir)}; starting from scratch")
    if args.resume is not None:  # the records past the checkpoint are logged again from here
        dropped = run.history.cut_after(run.state.step if resume is not None else -1)
        if dropped:
            accelerator.print(f"log_history.jsonl: dropped {dropped} record(s) of the steps this run logs again")
    run.state.sequences_per_step = run.sequences_per_step


def start_run(run: Run) -> None:
    """Start the trackers and the progress bar, say what one step is, and validate the weights of step 0."""
    accelerator, args, state = run.accelerator, run.args, run.state
    accelerator.init_trackers(args.run_name, config=_tracker_config(run.run_config))
    accelerator.print(
        f"{args.model}: {count_parameters(accelerator.unwrap_model(run.model)):,} parameters | "
        f"{accelerator.num_processes} process(es) x {args.batch_size} sequences x {run.layout.accumulation} "
        f"accumulation = {run.tokens_per_step:,} tokens/step"
    )
    run.metrics = {"start_step": state.step, "step": state.step, "tokens": state.tokens}
    run.progress = tqdm(total=args.max_steps, initial=state.step, desc="training",
                        disable=not accelerator.is_local_main_process)
    if state.step == 0 and (start := validate(run)) is not None:
        run.metrics.update(start_val_loss=start["loss"], start_val_perplexity=start["perplexity"])


class StepFeed:
    """This process's micro-batches of each step from the run's data order (train/data_order.py), the step's
    target tokens (all processes) and whether any process was asked to stop: one CPU collective per step."""

    def __init__(self, run: Run, train_split, stop_signal: StopOnSignal):
        self.batches = training_batches(train_split, run.layout, run.state.sequences, run.args.seed,
                                        pin_memory=run.accelerator.device.type == "cuda")
        self.agree = HostSums(run.accelerator)
        self.accumulation = run.layout.accumulation
        self.stop_signal = stop_signal

    def next_step(self) -> tuple[list[dict], int, bool]:
        micro_batches = [next(self.batches) for _ in range(self.accumulation)]
        local_targets = sum(int((batch["targets"] != PAD_TOKEN).sum()) for batch in micro_batches)
        targets, stops = self.agree(local_targets, self.stop_signal.received is not None)
        return micro_batches, targets, stops > 0

    def stop_reason(self) -> str:
        return self.stop_signal.received or "signal"


def distinct_word_senses(run: Run, train_split) -> DistinctWordSenses | None:
    """The sense network once per distinct word of each step (train/distinct_words.py), or None (per token).

    Under FSDP the table is computed inside each micro-batch's forward, where FSDP gathers the parameters.
    """
    args, plan = run.args, run.plan
    if args.model != "backpack" or not args.distinct_word_senses:
        return None
    distinct_words = training_distinct_words(
        run.accelerator.unwrap_model(run.model), train_split, args.batch_size, run.layout.accumulation,
        args.n_positions + 1, args.seed, share=not plan.sharded, static_shapes=args.compile,
        autocast=run.accelerator.autocast)
    lists = "exact word lists"
    if distinct_words.buckets is not None:
        # Each word-list size a run meets is a graph of its own; the limit allows twice that many.
        expect_graphs(torch._dynamo.config.recompile_limit + 2 * len(distinct_words.buckets))
        lists = f"word lists padded to {' / '.join(f'{size:,}' for size in distinct_words.buckets)} words"
    run.accelerator.print(f"distinct-word senses: the sense network runs once per distinct word of each "
                          f"{'step' if distinct_words.word_senses else 'micro-batch'}, {lists}")
    return distinct_words


class Throughput:
    """Tokens per second, and the words the sense network ran on per step, over the steps since the last log line.

    The words per step (this process's, bucket padding included) are what the Backpack's sense network executed:
    with the tokens they give its FLOPs per token (`bench/device_summary.py` reports the MFU on both counts).
    """

    def __init__(self, distinct_words: DistinctWordSenses | None = None):
        self.distinct_words = distinct_words
        self.reset()

    def reset(self) -> None:
        self.start, self.tokens, self.steps = time.perf_counter(), 0, 0
        self.words_before = self.distinct_words.words_computed if self.distinct_words is not None else 0

    def add_step(self, tokens: int) -> None:
        self.tokens += tokens
        self.steps += 1

    def per_second(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)

    def sense_words_per_step(self) -> float | None:
        """None when the sense network runs per token (GPT-2, or `--distinct_word_senses false`)."""
        if self.distinct_words is None or self.steps == 0:
            return None
        return (self.distinct_words.words_computed - self.words_before) / self.steps


def fit(run: Run, train_split, stop_signal: StopOnSignal) -> str | None:
    """The step loop, up to the run's last step or a signal: train, log, validate and save at their intervals.

    Returns the signal that stopped it early (None: it ran to its last step); the loop's speed is in ``metrics``.
    """
    args, state, metrics = run.args, run.state, run.metrics
    last_stop = final_step(args)
    start_tokens = state.tokens
    feed = StepFeed(run, train_split, stop_signal)
    distinct_words = distinct_word_senses(run, train_split)
    micro_batches, step_targets, stop = feed.next_step() if state.step < last_stop else ([], 0, False)
    started, window = time.perf_counter(), Throughput(distinct_words)
    stop_reason = feed.stop_reason() if stop else None
    while state.step < last_stop and stop_reason is None:
        targets = step_targets
        loss_sum = train_step(run, micro_batches, targets, distinct_words)
        window.add_step(run.tokens_per_step)
        run.progress.update(1)
        faults.at("after", "step")
        if state.step < last_stop:
            micro_batches, step_targets, stop = feed.next_step()
        else:
            stop = stop_signal.received is not None
        if stop:
            stop_reason = feed.stop_reason()

        if state.step % args.log_interval == 0 or state.step == last_stop or stop:
            metrics.update(train_loss=log_step(run, loss_sum, targets, window))
        metrics.update(step=state.step, tokens=state.tokens)
        if state.step % args.eval_interval == 0 or state.step == args.max_steps:
            check_finite(run)
            if (result := validate(run)) is not None:
                metrics.update(val_loss=result["loss"], val_perplexity=result["perplexity"])
        if stop_reason is None and state.step % args.save_interval == 0 and state.step < last_stop:
            save(run)
    run.progress.close()
    wall = time.perf_counter() - started
    metrics.update(train_seconds=wall, tokens_per_second=(state.tokens - start_tokens) / max(wall, 1e-9),
                   stopped_by=stop_reason)
    return stop_reason


def train_step(run: Run, micro_batches: list[dict], targets: int,
               distinct_words: DistinctWordSenses | None) -> torch.Tensor:
    """One optimizer step; returns its summed loss, left on the device (this process's micro-batches).

    Every micro-batch's summed loss is divided by the step's target count: the step's gradient is that of the mean
    over all its target tokens, whatever the split. Accelerate divides by the accumulation and DDP averages over
    processes; the factor undoes both.
    """
    accelerator, model, state = run.accelerator, run.model, run.state
    scale = accelerator.num_processes * run.layout.accumulation / max(targets, 1)
    loss_sum = step_gradients(model, micro_batches, scale, accelerator.backward,
                              lambda: micro_step(accelerator, model), distinct_words, accelerator.device)
    if not accelerator.sync_gradients:  # never silently a step that does not update the weights
        raise RuntimeError(f"gradients were not synchronised after {run.layout.accumulation} micro-batch(es) of "
                           f"step {state.step + 1} (accelerator.step {accelerator.step}): the optimizer would not step")
    run.watch.update(loss_sum, state.step + 1)
    if run.args.max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), run.args.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.sequences += run.sequences_per_step
    state.tokens += run.tokens_per_step
    return loss_sum


def log_step(run: Run, loss_sum: torch.Tensor, targets: int, window: Throughput) -> float:
    """Read the step's loss back (a sync), log it with the learning rate and throughput; returns the loss."""
    check_finite(run)
    step_loss = run.accelerator.reduce(loss_sum, reduction="sum").item() / max(targets, 1)
    record = {"train/loss": step_loss, "train/lr": run.scheduler.get_last_lr()[0],
              "train/tokens_per_second": window.per_second(), "train/tokens": run.state.tokens}
    if (sense_words := window.sense_words_per_step()) is not None:
        record["train/sense_network_words_per_step"] = sense_words
    run.history.write(record, step=run.state.step)
    run.progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{record['train/lr']:.2e}",
                             tok_s=f"{record['train/tokens_per_second']:,.0f}")
    window.reset()
    return step_loss


def validate(run: Run) -> dict | None:
    """Validation loss and perplexity, logged; None (nothing logged) when no token was scored."""
    accelerator, args, step = run.accelerator, run.args, run.state.step
    result = evaluate(run.model, run.validation_loader, accelerator, args.eval_batches, progress_bar=False)
    if result["tokens"] == 0:
        why = "--eval_batches 0" if args.eval_batches == 0 else "the validation split is empty"
        accelerator.print(f"step {step}: no validation ({why}): no validation metric is recorded")
        return None
    run.history.write({"val/loss": result["loss"], "val/perplexity": result["perplexity"]}, step=step)
    accelerator.print(f"step {step}: validation loss {result['loss']:.4f}, "
                      f"perplexity {result['perplexity']:.2f} ({result['tokens']:,} tokens)")
    return result


def check_finite(run: Run) -> None:
    """Stop without saving when a step since the start had a NaN / inf loss (reads the device: a sync)."""
    if (bad_step := run.watch.first(run.accelerator)) is not None:
        run.progress.close()
        run.accelerator.end_training()
        raise NonFiniteLossError(
            f"the training loss is not finite (NaN or inf) at step {bad_step}; stopping without saving. "
            f"{describe_newest(run.args.output_dir)} Resume with --resume latest, perhaps with a lower learning_rate "
            "(e.g. --learning_rate 1e-4: the command line's value is used, and said)."
        )


def save(run: Run) -> str:
    """A checkpoint of the run's state with its exported HF folder (never after a NaN loss); pushed if asked."""
    accelerator, args, state = run.accelerator, run.args, run.state

    def write_export(folder: str) -> None:
        export_model(accelerator, run.model, run.tokenizer, folder, run.run_config, {"step": state.step, **run.metrics})

    check_finite(run)  # a NaN loss since the last check: never saved
    folder = save_checkpoint(accelerator, args.output_dir, state, write_export, args.save_total_limit,
                             say=accelerator.print, sharded=run.sharded)
    if args.push_to_hub:
        publish(accelerator, os.path.join(folder, "model"), args, state.step)
    return folder


def finish_run(run: Run, stop_reason: str | None) -> None:
    """The last checkpoint (also when a signal stopped the loop), said."""
    folder = save(run)
    stopped = f" (stopped by {stop_reason})" if stop_reason else ""
    run.accelerator.print(f"Saved checkpoint {folder} at step {run.state.step}{stopped}")
