"""The training loop. Accelerate does all device work: placement, DDP / FSDP, mixed precision, accumulation.

One optimizer step = ``gradient_accumulation_steps`` micro-batches on every process; the loss shown and logged
is their mean over all processes. The loop validates every ``eval_interval`` steps, saves a checkpoint
(train/checkpointing.py: complete or not at all) every ``save_interval`` steps and at the end, stops cleanly
(with a checkpoint) when the caller's :class:`~backpack_train.interrupt.StopOnSignal` saw SIGTERM / SIGINT, and stops
without saving on a NaN / inf loss, so the last checkpoint on disk is a good one.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    TorchDynamoPlugin,
    parse_flag_from_env,
)
from tqdm.auto import tqdm
from transformers import get_scheduler

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
from backpack_train.data import make_dataloaders
from backpack_train.export import export_model
from backpack_train.interrupt import StopOnSignal
from backpack_train.loss import evaluate, next_token_loss
from backpack_train.model import build_optimizer, count_parameters
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
        # One graph for the whole forward (a graph break raises instead of silently splitting it) and static
        # shapes: every training step has the same shape, so nothing recompiles after the first step.
        dynamo_plugin=TorchDynamoPlugin(backend="inductor", fullgraph=True, dynamic=False) if args.compile else None,
    )


def endless_batches(accelerator: Accelerator, loader, skip: int) -> Iterator[dict]:
    """Micro-batches epoch after epoch (reshuffled by epoch number), starting after ``skip`` of them."""
    try:
        per_epoch = len(loader)
    except TypeError:  # streamed data: no length, skip by consuming
        per_epoch = None
    epoch, skip = divmod(skip, per_epoch) if per_epoch else (0, skip)
    while True:
        loader.set_epoch(epoch)
        yield from (accelerator.skip_first_batches(loader, skip) if skip else loader)
        skip, epoch = 0, epoch + 1


def _tracker_config(config: dict) -> dict:
    """Trackers (TensorBoard hparams) take scalars and strings only."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in config.items()}


def publish(accelerator: Accelerator, folder: str, args: TrainArguments, step: int) -> None:
    """Push an export to the Hub from the main process; a failed push warns and training goes on."""
    if accelerator.is_main_process:
        from hub_upload import HubUploadError, push_checkpoint  # only runs that publish need huggingface_hub's API

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


def train(args: TrainArguments, accelerator: Accelerator, model, packed, tokenizer, run_config: dict,
          stop_signal: StopOnSignal, resume: ResumePoint | None = None) -> tuple:
    """Train ``model`` on the packed splits from ``resume`` (or from scratch); returns the prepared model and the
    final metrics.

    Every checkpoint also gets an exported HF folder (``checkpoint_<i>/model``). ``stop_signal`` (entered by the
    caller, so that it also covers the final export) turns a first SIGTERM / SIGINT into a save and a stop. The
    caller ends the run with ``accelerator.end_training()`` once it is done.
    """
    model.train()
    optimizer = build_optimizer(model, args)
    scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.warmup_steps,
                              num_training_steps=args.max_steps)
    train_loader, validation_loader = make_dataloaders(packed, args.batch_size, args.seed)
    model, optimizer, train_loader, validation_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, validation_loader, scheduler
    )
    accelerator.register_save_state_pre_hook(drop_tied_aliases(accelerator))
    accumulation = accelerator.gradient_accumulation_steps
    sequences_per_step = args.batch_size * accumulation * accelerator.num_processes
    tokens_per_step = sequences_per_step * args.n_positions

    history = LogHistory(accelerator, args.output_dir)
    if resume is not None:
        state = load_checkpoint(accelerator, resume)
        if state.sequences_per_step not in (0, sequences_per_step):
            accelerator.print(f"warning: the checkpoint used {state.sequences_per_step} sequences per step, this "
                              f"run {sequences_per_step}; the data order will not match the original run")
        accelerator.print(f"Resumed from {resume.path} at step {state.step}")
    else:
        state = TrainingState()
        if args.resume == "latest":
            accelerator.print(f"No complete checkpoint in {checkpoints_root(args.output_dir)}; starting from scratch")
    if args.resume is not None:  # the records past the checkpoint are logged again from here
        dropped = history.cut_after(state.step if resume is not None else -1)
        if dropped:
            accelerator.print(f"log_history.jsonl: dropped {dropped} record(s) of the steps this run logs again")
    state.sequences_per_step = sequences_per_step

    accelerator.init_trackers(args.run_name, config=_tracker_config(run_config))
    accelerator.print(
        f"{args.model}: {count_parameters(accelerator.unwrap_model(model)):,} parameters | {accelerator.num_processes} "
        f"process(es) x {args.batch_size} sequences x {accumulation} accumulation = {tokens_per_step:,} tokens/step"
    )

    def validate() -> dict | None:
        """Validation loss and perplexity, logged; None (nothing logged) when no token was scored."""
        result = evaluate(model, validation_loader, accelerator, args.eval_batches, progress_bar=False)
        if result["tokens"] == 0:
            why = "--eval_batches 0" if args.eval_batches == 0 else "the validation split is empty"
            accelerator.print(f"step {state.step}: no validation ({why}): no validation metric is recorded")
            return None
        history.write({"val/loss": result["loss"], "val/perplexity": result["perplexity"]}, step=state.step)
        accelerator.print(f"step {state.step}: validation loss {result['loss']:.4f}, "
                          f"perplexity {result['perplexity']:.2f} ({result['tokens']:,} tokens)")
        return result

    def save(final_metrics: dict) -> str:
        def write_export(folder: str) -> None:
            export_model(accelerator, model, tokenizer, folder, run_config, {"step": state.step, **final_metrics})

        folder = save_checkpoint(accelerator, args.output_dir, state, write_export, args.save_total_limit,
                                 say=accelerator.print)
        if args.push_to_hub:
            publish(accelerator, os.path.join(folder, "model"), args, state.step)
        return folder

    metrics: dict = {"start_step": state.step, "step": state.step, "tokens": state.tokens}
    if state.step == 0 and (start := validate()) is not None:
        metrics.update(start_val_loss=start["loss"], start_val_perplexity=start["perplexity"])
    last_stop = final_step(args)
    batches = endless_batches(accelerator, train_loader, state.micro_batches)
    progress = tqdm(total=args.max_steps, initial=state.step, desc="training",
                    disable=not accelerator.is_local_main_process)
    started, window_start, window_tokens, stop_reason = time.perf_counter(), time.perf_counter(), 0, None
    while state.step < last_stop:
        step_loss = torch.zeros((), device=accelerator.device)
        for _ in range(accumulation):
            batch = next(batches)
            with accelerator.accumulate(model):
                loss = next_token_loss(model, batch)
                accelerator.backward(loss)
            step_loss += loss.detach()
            state.micro_batches += 1
        step_loss = accelerator.reduce(step_loss / accumulation, reduction="mean").item()
        if not math.isfinite(step_loss):
            progress.close()
            accelerator.end_training()
            raise NonFiniteLossError(
                f"loss is {step_loss} at step {state.step + 1}; stopping without saving. "
                f"{describe_newest(args.output_dir)} Resume with --resume latest, perhaps with a lower learning_rate."
            )
        if args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens += tokens_per_step
        window_tokens += tokens_per_step
        progress.update(1)

        if state.step % args.log_interval == 0 or state.step == last_stop:
            elapsed = time.perf_counter() - window_start
            record = {"train/loss": step_loss, "train/lr": scheduler.get_last_lr()[0],
                      "train/tokens_per_second": window_tokens / max(elapsed, 1e-9), "train/tokens": state.tokens}
            history.write(record, step=state.step)
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{record['train/lr']:.2e}",
                                 tok_s=f"{record['train/tokens_per_second']:,.0f}")
            window_start, window_tokens = time.perf_counter(), 0
        metrics.update(train_loss=step_loss, step=state.step, tokens=state.tokens)
        if state.step % args.eval_interval == 0 or state.step == args.max_steps:
            if (result := validate()) is not None:
                metrics.update(val_loss=result["loss"], val_perplexity=result["perplexity"])
        faults.at("after", "step")
        if accelerator.check_trigger():
            stop_reason = stop_signal.received or "signal"
            break
        if state.step % args.save_interval == 0 and state.step < last_stop:
            save(metrics)
    progress.close()
    wall = time.perf_counter() - started
    trained_tokens = state.tokens - metrics["start_step"] * tokens_per_step
    metrics.update(train_seconds=wall, tokens_per_second=trained_tokens / max(wall, 1e-9), stopped_by=stop_reason)
    folder = save(metrics)
    stopped = f" (stopped by {stop_reason})" if stop_reason else ""
    accelerator.print(f"Saved checkpoint {folder} at step {state.step}{stopped}")
    return model, metrics
