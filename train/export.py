"""Export a model as a Hugging Face folder that loads in a fresh process.

The folder holds safetensors weights, ``config.json`` (with ``auto_map`` for a Backpack), the Backpack's two
code files (copied by ``save_pretrained`` because the classes are registered for the Auto classes), the tokenizer,
``generation_config.json`` and ``training_args.json`` (the run's arguments and metrics). It loads with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` and ``pipeline("text-generation")``.

The run's final export ``<output_dir>/model`` is written beside its place and renamed into it, so that the
folder under that name is always a whole export (an older one, or the new one).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

from accelerate import Accelerator
from transformers.utils import logging as hf_logging

from backpack.checkpoints import CheckpointError
from backpack.files import hidden_sibling, reason_for_write_failure, replace_folder, write_json_atomically
from backpack_train.checkpointing import describe_newest
from backpack_train.parallel import model_for_export

FINAL_EXPORT_DIR = "model"


class ExportError(CheckpointError):
    """The final export could not be written (the OS's reason); nothing half-written is left under its name."""


def _export_failed(error: BaseException, final: str, temporary: str, output_dir: str) -> ExportError:
    """The error to raise for a failed final export: the OS's reason, what is left, and how to finish."""
    folder = temporary if temporary and os.path.isdir(temporary) else os.path.dirname(os.path.abspath(final))
    if isinstance(error, shutil.Error):  # copytree's list of failures: the OS's own reason comes from a probe
        error = RuntimeError(error.args[0][0][2] if error.args and error.args[0] else str(error))
    reason = reason_for_write_failure(error, folder)
    return ExportError(f"could not write the final export {final}: {reason}. Nothing half-written was left under "
                       f"that name. {describe_newest(output_dir)} Once the cause is fixed (e.g. space freed), the same "
                       "command with --resume latest writes the export from the checkpoint of the last step.")


def export_model(accelerator: Accelerator, model, tokenizer, folder: str, training_args: dict,
                 metrics: dict) -> None:
    """Write the HF folder (main process only; every process must call this, FSDP gathers the weights)."""
    unwrapped, state_dict = model_for_export(accelerator, model)  # FSDP: gathered on the main process
    if accelerator.is_main_process:
        os.makedirs(folder, exist_ok=True)
        with _without_transformers_progress_bars():  # a bar under the training bar leaves `[A` in log files
            unwrapped.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        write_json_atomically(os.path.join(folder, "training_args.json"),
                              _jsonable({"training_args": training_args, "metrics": metrics}))
    accelerator.wait_for_everyone()


@contextmanager
def _without_transformers_progress_bars() -> Iterator[None]:
    """transformers' own progress bars off for a moment (its "Writing model shards" bar at every save)."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _jsonable(value):
    """Arguments and metrics as JSON values (anything else as its string)."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def _remove_leftovers(final: str) -> None:
    """Hidden folders of an earlier export that a crash interrupted."""
    parent, name = os.path.split(os.path.abspath(final))
    for entry in os.listdir(parent) if os.path.isdir(parent) else []:
        if entry.startswith(f".{name}.") and entry.split(".")[-1].split("-")[0] in ("tmp", "old"):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def export_final_model(accelerator: Accelerator, model, tokenizer, output_dir: str, training_args: dict,
                       metrics: dict) -> str:
    """Write ``<output_dir>/model`` atomically (every process must call this); returns its path."""
    final = os.path.join(output_dir, FINAL_EXPORT_DIR)
    temporary = ""
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        _remove_leftovers(final)
        temporary = hidden_sibling(final, "tmp")
    try:
        export_model(accelerator, model, tokenizer, temporary, training_args, metrics)
        if accelerator.is_main_process:
            replace_folder(temporary, final)
    except Exception as error:  # a full disk, a quota, a read-only folder: one line, and how to finish
        failure = _export_failed(error, final, temporary, output_dir)
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)
        raise failure from error
    except BaseException:  # a second signal: no half-written folder stays behind
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)
        raise
    return final


def restore_final_model(checkpoint: str, output_dir: str) -> str:
    """Copy a checkpoint's export to ``<output_dir>/model`` (atomically), e.g. after a stop during the final export."""
    final = os.path.join(output_dir, FINAL_EXPORT_DIR)
    _remove_leftovers(final)
    temporary = hidden_sibling(final, "tmp")
    try:
        shutil.copytree(os.path.join(checkpoint, FINAL_EXPORT_DIR), temporary)
        replace_folder(temporary, final)
    except OSError as error:  # a full disk (shutil.Error, an OSError, gathers the copy's failures)
        failure = _export_failed(error, final, temporary, output_dir)
        shutil.rmtree(temporary, ignore_errors=True)
        raise failure from error
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return final
