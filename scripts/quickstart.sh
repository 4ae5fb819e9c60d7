#!/usr/bin/env bash
# The README's main command: from a fresh clone, set up the environment and train the `nano` Backpack on the
# embedded offline corpus (gensim's Wikipedia sample + Lee news corpus), then load the exported folder back
# through `pipeline("text-generation")` and print a sample and the top words of a few senses of a few words.
#
#   bash scripts/quickstart.sh                 # Backpack
#   bash scripts/quickstart.sh --model gpt2    # the GPT-2 baseline on the same budget (no senses to show)
#
# Extra arguments go to train/pretrain.py (e.g. --max_steps 50). Run time: README.md, "Main command".
set -euo pipefail
cd "$(dirname "$0")/.."

# torch first, pinned to the tested release: left to the resolver, a plain `torch` can be a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install --quiet --disable-pip-version-check torch==2.13.0
python -m pip install --quiet --disable-pip-version-check -e '.[train]'

output_dir=outputs/nano
for arg in "$@"; do [ "$arg" = gpt2 ] && output_dir=outputs/nano-gpt2; done
# A rerun of the main command replaces its own earlier run (the trainer refuses a used folder unless told).
python train/pretrain.py --config nano --output_dir "$output_dir" --overwrite_output_dir true "$@"
python train/demo.py "$output_dir/model"
