"""Export a model as a Hugging Face folder that loads in a fresh process.

The folder holds safetensors weights, ``config.json`` (with ``auto_map`` for a Backpack), the Backpack's two
code files (copied by ``save_pretrained`` because the classes are registered for the Auto classes), the tokenizer,
``generation_config.json`` and ``training_args.json`` (the run's arguments and metrics). It loads with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` and ``pipeline("text-generation")``.
"""

from __future__ import annotations

import json
import os

from accelerate import Accelerator


def export_model(accelerator: Accelerator, model, tokenizer, folder: str, training_args: dict,
                 metrics: dict) -> None:
    """Write the HF folder (main process only; every process must call this, FSDP gathers the weights)."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        os.makedirs(folder, exist_ok=True)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        with open(os.path.join(folder, "training_args.json"), "w") as handle:
            json.dump({"training_args": training_args, "metrics": metrics}, handle, indent=2, default=str)
    accelerator.wait_for_everyone()
