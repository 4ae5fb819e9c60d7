"""Next-token loss on packed blocks, the trainer's step (forward and backward of its micro-batches), and validation
loss / perplexity over a loader."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from backpack_train.distinct_words import DistinctWordSenses


def token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], **senses: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every target token (batch, seq); ignored targets (-100) get 0.

    The loss is computed here rather than by the model because a block's targets are ``block[1:]``, not the
    inputs shifted inside the model: that way every token of a block of ``n + 1`` is a target. ``senses`` are the
    Backpack's distinct-word arguments (``sense_index`` with ``sense_words`` or ``word_senses``), if any.
    """
    # Packed blocks have no padding: no mask, so attention and the sense sum run their causal fused kernels.
    logits = model(input_ids=batch["input_ids"], use_cache=False, **senses).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten(), ignore_index=-100,
                           reduction="none").view_as(batch["targets"])


def next_token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the batch's target tokens."""
    losses = token_losses(model, batch)
    return losses.sum() / (batch["targets"] != -100).sum().clamp(min=1)


def step_gradients(
    model: torch.nn.Module,
    micro_batches: Sequence[dict],
    scale: float = 1.0,
    backward: Callable[[torch.Tensor], None] | None = None,
    micro_step: Callable[[], AbstractContextManager] = nullcontext,
    distinct_words: DistinctWordSenses | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Forward and backward of one optimizer step's micro-batches: the trainer's step, also timed and counted by
    the benchmark. Returns the step's summed token loss (detached, on the device: nothing is read back).

    Each micro-batch's summed token loss times ``scale`` is backpropagated with ``backward`` inside ``micro_step()``:
    the trainer passes ``accelerator.backward``, ``accelerator.accumulate``-like contexts and the scale that makes
    the step's gradient that of the mean over all its target tokens. CPU micro-batches are moved to ``device`` one
    by one. With ``distinct_words`` a Backpack runs its sense network once per distinct word of the step
    (train/distinct_words.py) rather than once per token; its word lists are read from the CPU micro-batches.
    """
    backward = backward or torch.Tensor.backward
    arguments = (distinct_words.forward_arguments(micro_batches, device) if distinct_words is not None
                 else [{}] * len(micro_batches))
    loss_sum = None
    for batch, senses in zip(micro_batches, arguments):
        if device is not None:
            batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        with micro_step():
            batch_loss = token_losses(model, batch, **senses).sum()
            backward(batch_loss * scale)
        loss_sum = batch_loss.detach() if loss_sum is None else loss_sum + batch_loss.detach()
    return loss_sum


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, accelerator, max_batches: int | None = None,
             desc: str = "validation", progress_bar: bool = True) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over (the first ``max_batches`` batches of) ``loader``.

    ``max_batches`` counts batches of all processes together.

    Per-sequence sums are gathered with ``gather_for_metrics``, which drops the samples Accelerate repeats to
    even out the last batch across processes, so the result is exact under any number of processes. With no
    token scored (``max_batches=0``, an empty split) loss and perplexity are NaN, never a perplexity of 1.
    """
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    batches = len(loader)  # per process
    if max_batches is not None:  # counted over all processes, so any number of processes sees the same batches
        batches = min(batches, math.ceil(max_batches / accelerator.num_processes))
    # No bar inside the training loop's own: a second bar under it leaves cursor codes (`[A`) in every log file.
    progress = tqdm(total=batches, desc=desc, leave=False,
                    disable=not (progress_bar and accelerator.is_local_main_process))
    for index, batch in enumerate(loader):
        if index >= batches:
            break
        losses = token_losses(model, batch)
        sums, counts = accelerator.gather_for_metrics(
            (losses.sum(dim=1), (batch["targets"] != -100).sum(dim=1))
        )
        total_loss += sums.double().sum().item()
        total_tokens += int(counts.sum().item())
        progress.update(1)
    progress.close()
    model.train(was_training)
    if total_tokens == 0:
        return {"loss": math.nan, "perplexity": math.nan, "tokens": 0}
    loss = total_loss / total_tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": total_tokens}
