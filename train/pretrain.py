"""Pretrain a Backpack GPT-2 (or the GPT-2 baseline) with Accelerate.

    accelerate launch train/pretrain.py --config train/configs/small.yaml --dataset openwebtext
    python train/pretrain.py --config nano                       # one process, embedded offline corpus
    accelerate launch --cpu --num_processes 2 train/pretrain.py --config nano --max_steps 50
    python train/pretrain.py --config nano --model gpt2           # the Transformer baseline, same loop and data

Any key of train/config.py can follow as ``--key value``; ``--resume latest`` continues a run exactly.
"""

from __future__ import annotations

import os
import sys
import time

# Run as a script, Python puts train/ first on sys.path, where config.py, data.py ... would shadow other
# modules; the repository root goes there instead, so `train.*` and the model files import from a clone.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = _ROOT
elif _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from accelerate import PartialState  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402

from backpack.tokenizer import gpt2_tokenizer  # noqa: E402
from train.config import DataArguments, TrainArguments, as_dict, gradient_accumulation_steps, parse_args  # noqa: E402
from train.data import check_data_source, prepare_datasets  # noqa: E402
from train.export import export_model  # noqa: E402
from train.loop import NonFiniteLossError, build_accelerator, train, use_cpu  # noqa: E402
from train.model import build_model  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    """Parse arguments, prepare data, build the model, train, export; returns the final metrics."""
    started = time.perf_counter()
    data_args, args = parse_args((DataArguments, TrainArguments), argv, description=__doc__)
    check_data_source(data_args)  # a missing dataset or file fails here, before anything is built
    accumulation = gradient_accumulation_steps(args, PartialState(cpu=use_cpu(args)).num_processes)
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
    model, metrics = train(args, accelerator, model, packed, tokenizer, run_config)
    metrics["wall_seconds"] = time.perf_counter() - started

    final_folder = os.path.join(args.output_dir, "model")
    export_model(accelerator, model, tokenizer, final_folder, run_config, metrics)
    accelerator.end_training()
    perplexities = [metrics[key] for key in ("start_val_perplexity", "val_perplexity") if key in metrics]
    accelerator.print(
        f"Done: {metrics['step']} steps, {metrics['tokens_per_second']:,.0f} tokens/s, validation perplexity "
        f"{' -> '.join(f'{value:.2f}' for value in perplexities) or 'not measured'}, wall time "
        f"{metrics['wall_seconds']:.0f}s. Model: {final_folder}"
    )
    return metrics


if __name__ == "__main__":
    try:
        main()
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
