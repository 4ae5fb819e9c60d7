"""Validation in a fresh process: the staging folder loads with ``trust_remote_code=True`` and matches.

A new Python process (its own module cache, offline, a working directory without this package) loads the folder
through ``AutoModelForCausalLM``, compares its logits on a fixed input with the reference computed here, and runs
the text-generation pipeline: the repo is only pushed if all of it works as it will for a user of the Hub.

``trust_remote_code=True`` imports the folder's code, so the folder must hold no code but this package's two
model files (checked before the process starts, :func:`check_only_installed_code`): no other ``.py`` file, no
``custom_generate/`` folder (``from_pretrained`` would install its ``generate``), no ``auto_map`` entry that points
``AutoConfig`` or ``AutoModelForCausalLM`` elsewhere. The tokenizer and the pipeline are built with
``trust_remote_code=False``, so a tokenizer ``auto_map`` or a ``custom_pipelines`` entry is never followed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from modeling_backpack_gpt2 import BackpackGPT2LMHeadModel

from .errors import ValidationFailed
from .staging import AUTO_MAP, CODE_MODULES

VALIDATION_PROMPT = "The Backpack language model predicts the next word from"
VALIDATION_NEW_TOKENS = 5

# Runs with the staging folder and a reference file as arguments; prints one JSON line. It imports nothing of
# this package: the model must come from the staging folder's own code, as it will from the Hub.
_VALIDATION_SCRIPT = r"""
import json, sys, traceback
result = {"ok": False}
try:
    import torch
    from transformers import AutoModelForCausalLM, pipeline
    from transformers import AutoTokenizer
    staging, reference_path, prompt, new_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    tokenizer_path = sys.argv[5] if len(sys.argv) > 5 else staging
    reference = torch.load(reference_path, weights_only=True)
    # Only the model's code comes from the folder (its two files, checked beforehand); never the tokenizer's.
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(staging, trust_remote_code=True).eval()
    result["model_class"] = f"{type(model).__module__}.{type(model).__qualname__}"
    with torch.no_grad():
        logits = model(reference["input_ids"], attention_mask=reference["attention_mask"]).logits
    expected = reference["logits"]
    result["shape_ok"] = list(logits.shape) == list(expected.shape)
    result["logits_equal"] = bool(result["shape_ok"] and torch.equal(logits, expected))
    result["max_abs_diff"] = float((logits.float() - expected.float()).abs().max()) if result["shape_ok"] else None
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer, trust_remote_code=False)
    output = generator(prompt, max_new_tokens=new_tokens, do_sample=False)
    result["generated_text"] = output[0]["generated_text"]
    result["ok"] = True
except Exception as error:
    result["error"] = f"{type(error).__name__}: {error}"
    result["traceback"] = traceback.format_exc(limit=6)
print("VALIDATION-RESULT " + json.dumps(result))
"""


@dataclass
class ValidationReport:
    """What the fresh process saw."""

    model_class: str
    logits_equal: bool
    max_abs_diff: float
    prompt: str
    generated_text: str
    seconds: float

    def summary(self) -> str:
        return (f"loaded as {self.model_class}; logits {'identical' if self.logits_equal else 'NOT identical'} to the "
                f"checkpoint's (max |diff| {self.max_abs_diff:.1e}); pipeline: {self.generated_text!r}")


def reference_batch(model: BackpackGPT2LMHeadModel, tokenizer) -> dict[str, torch.Tensor]:
    """A fixed input (the prompt, plus a left-padded shorter copy) and the checkpoint's logits for it."""
    # Any ids the model accepts make a fair comparison; a vocabulary smaller than the tokenizer's gets them folded in.
    vocab_size = model.config.vocab_size
    ids = [i % vocab_size for i in tokenizer(VALIDATION_PROMPT, add_special_tokens=False).input_ids]
    ids = ids[: model.config.n_positions]
    short = ids[: max(1, len(ids) // 2)]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else (model.config.eos_token_id or 0)
    pad %= vocab_size
    input_ids = torch.tensor([ids, [pad] * (len(ids) - len(short)) + short])
    attention_mask = torch.tensor([[1] * len(ids), [0] * (len(ids) - len(short)) + [1] * len(short)])
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask).logits
    return {"input_ids": input_ids, "attention_mask": attention_mask, "logits": logits}


def check_only_installed_code(staging: str | os.PathLike) -> None:
    """Refuse a folder whose remote code would be anything but this package's two installed model files.

    Raises:
        ValidationFailed: naming each file or ``auto_map`` entry that would run other code.
    """
    staging = Path(staging)
    installed = {Path(module.__file__).name: Path(module.__file__).read_bytes() for module in CODE_MODULES}
    foreign = []
    for path in sorted(staging.rglob("*")):
        relative = path.relative_to(staging).as_posix()
        if path.is_dir() and path.name == "custom_generate":
            foreign.append(f"{relative}/ (a custom generate())")
        elif path.is_file() and path.suffix == ".py" and installed.get(relative) != path.read_bytes():
            foreign.append(relative)
    config_path = staging / "config.json"
    try:
        auto_map = json.loads(config_path.read_text(encoding="utf-8")).get("auto_map") or {}
    except (OSError, ValueError, AttributeError) as error:
        raise ValidationFailed(f"can't read {config_path}: {error}") from error
    foreign += [f"config.json auto_map {key} -> {auto_map.get(key)}" for key, value in AUTO_MAP.items()
                if auto_map.get(key) != value]
    if foreign:
        raise ValidationFailed("the folder to load with trust_remote_code=True holds code that is not this "
                               f"package's model code, which is never run: {', '.join(foreign)}")


def validate_staging(staging: str | os.PathLike, reference: dict[str, torch.Tensor], *,
                     tokenizer_dir: str | os.PathLike | None = None, timeout: float = 900.0) -> ValidationReport:
    """Load ``staging`` with remote code in a fresh process, compare logits with ``reference``, run the pipeline.

    Args:
        tokenizer_dir: The pipeline's tokenizer, for a staging folder without one (default: the staging folder);
            loaded with ``trust_remote_code=False``.

    Raises:
        ValidationFailed: with the reason (code other than the installed model files, import error, mismatch,
            pipeline failure, timeout).
    """
    started = time.perf_counter()
    check_only_installed_code(staging)
    with tempfile.TemporaryDirectory(prefix="backpack-validate-") as scratch:
        reference_path = Path(scratch) / "reference.pt"
        torch.save(reference, reference_path)
        env = dict(os.environ)
        # Its own module cache (no stale copy of the code from an earlier folder of the same name), no network,
        # and a working directory without this package's modules (the result also checks where the class came from).
        env.update(HF_MODULES_CACHE=str(Path(scratch) / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false")
        command = [sys.executable, "-c", _VALIDATION_SCRIPT, str(Path(staging).resolve()), str(reference_path),
                   VALIDATION_PROMPT, str(VALIDATION_NEW_TOKENS)]
        if tokenizer_dir is not None:
            command.append(str(Path(tokenizer_dir).resolve()))
        try:
            process = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as error:
            raise ValidationFailed(f"validation did not finish in {timeout:.0f}s") from error
    line = next((l for l in reversed(process.stdout.splitlines()) if l.startswith("VALIDATION-RESULT ")), None)
    if line is None:
        tail = (process.stderr or process.stdout).strip().splitlines()[-8:]
        raise ValidationFailed(f"the validation process exited with code {process.returncode}:\n  "
                               + "\n  ".join(tail))
    result = json.loads(line[len("VALIDATION-RESULT "):])
    if not result["ok"]:
        raise ValidationFailed(f"the staging folder does not load or generate: {result['error']}\n"
                               + textwrap.indent(result.get("traceback", "").strip(), "  "))
    if not result["model_class"].startswith("transformers_modules."):
        raise ValidationFailed(f"the model loaded as {result['model_class']}, not from the folder's remote code")
    if not result["shape_ok"]:
        raise ValidationFailed("the staging folder's logits have another shape than the checkpoint's")
    if not result["logits_equal"]:
        raise ValidationFailed(f"the staging folder's logits differ from the checkpoint's (max |diff| "
                               f"{result['max_abs_diff']:.3g}) on {VALIDATION_PROMPT!r}")
    if not result["generated_text"].startswith(VALIDATION_PROMPT):
        raise ValidationFailed(f"the pipeline returned {result['generated_text']!r}, which does not continue the "
                               "prompt")
    return ValidationReport(result["model_class"], True, result["max_abs_diff"], VALIDATION_PROMPT,
                            result["generated_text"], time.perf_counter() - started)
