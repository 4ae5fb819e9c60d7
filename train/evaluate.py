"""Perplexity of a saved model folder (Backpack or GPT-2) on a dataset, local files or the embedded corpus.

    python train/evaluate.py --model_path outputs/nano/model                       # embedded validation split
    python train/evaluate.py --model_path outputs/nano/model --data_files my.txt --split train
    accelerate launch train/evaluate.py --model_path stanfordnlp/backpack-gpt2 --dataset Skylion007/openwebtext

Text is packed exactly as in training (EOS between documents, blocks of ``block_size + 1`` overlapping by one
token, so every token after the first is scored once).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from accelerate import Accelerator
from torch.utils.data import DataLoader

from backpack.loading import load_model
from backpack_train.config import ConfigError, DataArguments, parse_args
from backpack_train.data import check_data_source, collate_blocks, prepare_datasets
from backpack_train.loss import evaluate


@dataclass
class EvalArguments:
    """What to evaluate and how."""

    model_path: str = field(metadata={"help": "Saved model folder (or Hub name) to evaluate."})
    split: str = field(default="validation", metadata={"help": "train or validation."})
    block_size: int | None = field(default=None, metadata={"help": "Tokens per window (default: n_positions)."})
    batch_size: int = 8
    max_batches: int | None = field(default=None, metadata={"help": "Evaluate only the first N batches."})
    mixed_precision: str | None = field(default=None, metadata={"help": "no, bf16 or fp16."})
    cpu: bool = False
    output_json: str | None = field(default=None, metadata={"help": "Also write the result to this JSON file."})


def load_model_and_tokenizer(path: str):
    """The model and its tokenizer (the folder's or Hub repo's own, else GPT-2's), through the package's loader.

    A Backpack loads with the installed classes (its checkpoint's own code is never run), any other model with
    ``AutoModelForCausalLM`` and ``trust_remote_code=False``; the model stays on the CPU for Accelerate to place.
    """
    return load_model(path, device=None)


def check_eval_args(eval_args: EvalArguments, data_args: DataArguments) -> None:
    """Refuse flags out of range before the model or data are loaded (``ConfigError``, naming the flag)."""
    if data_args.streaming:
        raise ConfigError("evaluation needs a finite split: drop --streaming")
    if eval_args.split not in ("train", "validation"):
        raise ConfigError(f"--split must be train or validation, got {eval_args.split}")
    for flag, value, minimum in (("--block_size", eval_args.block_size, 1), ("--batch_size", eval_args.batch_size, 1),
                                 ("--max_batches", eval_args.max_batches, 0)):
        if value is not None and value < minimum:
            raise ConfigError(f"{flag} must be an integer >= {minimum}"
                              + (" (or left out: all of them)" if flag == "--max_batches" else "")
                              + f", got {value}")


def main(argv: list[str] | None = None) -> dict:
    """Evaluate and print loss and perplexity; returns them."""
    data_args, eval_args = parse_args((DataArguments, EvalArguments), argv, description=__doc__)
    check_eval_args(eval_args, data_args)
    check_data_source(data_args)
    accelerator = Accelerator(mixed_precision=eval_args.mixed_precision, cpu=eval_args.cpu)
    model, tokenizer = load_model_and_tokenizer(eval_args.model_path)
    block_size = eval_args.block_size or model.config.n_positions
    if block_size > model.config.n_positions:
        raise ValueError(f"--block_size {block_size} exceeds the model's n_positions {model.config.n_positions}")
    with accelerator.main_process_first():
        blocks = prepare_datasets(data_args, tokenizer, block_size=block_size + 1)[eval_args.split]
    loader = DataLoader(blocks, batch_size=eval_args.batch_size, shuffle=False,
                        collate_fn=lambda examples: collate_blocks(examples, tokenizer.eos_token_id))
    model, loader = accelerator.prepare(model, loader)
    result = evaluate(model, loader, accelerator, eval_args.max_batches, desc=f"evaluating {eval_args.split}")
    if result["tokens"] == 0:
        why = "--max_batches 0" if eval_args.max_batches == 0 else f"the {eval_args.split} split is empty"
        raise ValueError(f"no token was scored ({why}): there is no loss or perplexity to report")
    result.update(model_path=eval_args.model_path, split=eval_args.split, block_size=block_size)
    accelerator.print(f"{eval_args.model_path} on {eval_args.split}: loss {result['loss']:.4f}, "
                      f"perplexity {result['perplexity']:.2f} over {result['tokens']:,} tokens")
    if eval_args.output_json and accelerator.is_main_process:
        with open(eval_args.output_json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


def cli(argv: list[str] | None = None) -> int:
    """Run :func:`main`; a problem with the arguments, the model or the data is one message, exit status 2."""
    try:
        main(argv)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
