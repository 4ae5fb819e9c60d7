"""The training loop. Accelerate does all device work: placement, DDP / FSDP, mixed precision, accumulation.

One optimizer step = ``gradient_accumulation_steps`` micro-batches on every process; the loss shown and logged
is their mean over all processes. The loop validates every ``eval_interval`` steps, saves every
``save_interval`` steps and at the end, stops cleanly (with a checkpoint) on SIGTERM / SIGINT, and stops
without saving on a NaN / inf loss, so the last checkpoint on disk is a good one.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    parse_flag_from_env,
)
from tqdm.auto import tqdm
from transformers import get_scheduler

from train.checkpointing import TrainingState, checkpoint_index, resolve_resume
from train.config import TrainArguments
from train.data import make_dataloaders
from train.export import export_model
from train.interrupt import StopOnSignal
from train.loss import evaluate, next_token_loss
from train.model import build_optimizer, count_parameters


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf."""


def use_cpu(args: TrainArguments) -> bool:
    """Whether to run on CPU: asked for (``--cpu true`` or ``accelerate launch --cpu``), or no accelerator exists.

    Saying so explicitly matters for several processes: Accelerate sets up CPU (gloo) DDP only when told ``cpu``.
    """
    return args.cpu or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.accelerator.is_available()


def build_accelerator(args: TrainArguments, gradient_accumulation_steps: int) -> Accelerator:
    """The run's Accelerator: accumulation, mixed precision, trackers, numbered checkpoints, seeded data order."""
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
            automatic_checkpoint_naming=True, total_limit=args.save_total_limit,
        ),
        dynamo_backend="inductor" if args.compile else None,
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


class LogHistory:
    """``log_history.jsonl`` in the output folder: one JSON line per logged step or evaluation (main process)."""

    def __init__(self, accelerator: Accelerator, output_dir: str):
        self.accelerator = accelerator
        self.path = os.path.join(output_dir, "log_history.jsonl")
        os.makedirs(output_dir, exist_ok=True)

    def write(self, record: dict, step: int) -> None:
        self.accelerator.log(record, step=step)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"step": step, **record}) + "\n")


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


def train(args: TrainArguments, accelerator: Accelerator, model, packed, tokenizer, run_config: dict) -> tuple:
    """Train ``model`` on the packed splits; returns the prepared model and the final metrics.

    Every checkpoint also gets an exported HF folder (``checkpoint_<i>/model``). The caller ends the run with
    ``accelerator.end_training()`` (which closes the trackers and the process group) once it is done.
    """
    model.train()
    optimizer = build_optimizer(model, args)
    scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.warmup_steps,
                              num_training_steps=args.max_steps)
    train_loader, validation_loader = make_dataloaders(packed, args.batch_size, args.seed)
    model, optimizer, train_loader, validation_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, validation_loader, scheduler
    )
    state = TrainingState()
    accelerator.register_for_checkpointing(state)
    accumulation = accelerator.gradient_accumulation_steps
    sequences_per_step = args.batch_size * accumulation * accelerator.num_processes
    tokens_per_step = sequences_per_step * args.n_positions

    resume_from = resolve_resume(args.resume, args.output_dir)
    if resume_from is not None:
        accelerator.load_state(resume_from)
        accelerator.project_configuration.iteration = checkpoint_index(resume_from) + 1
        if state.sequences_per_step not in (0, sequences_per_step):
            accelerator.print(f"warning: the checkpoint used {state.sequences_per_step} sequences per step, this "
                              f"run {sequences_per_step}; the data order will not match the original run")
        accelerator.print(f"Resumed from {resume_from} at step {state.step}")
    elif args.resume == "latest":
        accelerator.print(f"No checkpoint in {args.output_dir}; starting from scratch")
    state.sequences_per_step = sequences_per_step

    accelerator.init_trackers(args.run_name, config=_tracker_config(run_config))
    history = LogHistory(accelerator, args.output_dir)
    accelerator.print(
        f"{args.model}: {count_parameters(accelerator.unwrap_model(model)):,} parameters | {accelerator.num_processes} "
        f"process(es) x {args.batch_size} sequences x {accumulation} accumulation = {tokens_per_step:,} tokens/step"
    )

    def validate() -> dict:
        result = evaluate(model, validation_loader, accelerator, args.eval_batches)
        history.write({"val/loss": result["loss"], "val/perplexity": result["perplexity"]}, step=state.step)
        accelerator.print(f"step {state.step}: validation loss {result['loss']:.4f}, "
                          f"perplexity {result['perplexity']:.2f} ({result['tokens']:,} tokens)")
        return result

    def save(final_metrics: dict) -> None:
        accelerator.save_state()
        folder = os.path.join(accelerator.project_dir, "checkpoints",
                              f"checkpoint_{accelerator.save_iteration - 1}", "model")
        export_model(accelerator, model, tokenizer, folder, run_config, {"step": state.step, **final_metrics})
        if args.push_to_hub:
            publish(accelerator, folder, args, state.step)

    metrics: dict = {"start_step": state.step, "step": state.step, "tokens": state.tokens}
    if state.step == 0:
        start = validate()
        metrics.update(start_val_loss=start["loss"], start_val_perplexity=start["perplexity"])
    last_stop = min(args.max_steps, args.stop_at_step or args.max_steps)
    batches = endless_batches(accelerator, train_loader, state.micro_batches)
    progress = tqdm(total=args.max_steps, initial=state.step, desc="training",
                    disable=not accelerator.is_local_main_process)
    started, window_start, window_tokens, stop_reason = time.perf_counter(), time.perf_counter(), 0, None
    with StopOnSignal(accelerator) as stop_signal:
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
                    f"loss is {step_loss} at step {state.step + 1}; stopping without saving. The last good "
                    f"checkpoint is kept in {os.path.join(args.output_dir, 'checkpoints')} (resume with --resume "
                    "latest, perhaps with a lower learning_rate)."
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
                result = validate()
                metrics.update(val_loss=result["loss"], val_perplexity=result["perplexity"])
            if accelerator.check_trigger():
                stop_reason = stop_signal.received or "signal"
                break
            if state.step % args.save_interval == 0 and state.step < last_stop:
                save(metrics)
    progress.close()
    wall = time.perf_counter() - started
    trained_tokens = state.tokens - metrics["start_step"] * tokens_per_step
    metrics.update(train_seconds=wall, tokens_per_second=trained_tokens / max(wall, 1e-9), stopped_by=stop_reason)
    save(metrics)
    stopped = f" (stopped by {stop_reason})" if stop_reason else ""
    accelerator.print(f"Saved checkpoint at step {state.step}{stopped}")
    return model, metrics
