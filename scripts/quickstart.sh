#!/usr/bin/env bash
# The README's first command: from a fresh clone, use (or make) a virtual environment, install, train the `nano`
# Backpack on the embedded offline corpus (gensim's Wikipedia sample + Lee news corpus), load the exported folder
# back through `pipeline("text-generation")`, print a sample and the top words of a few senses, then the commands
# to try next on that model.
#
#   bash scripts/quickstart.sh                 # Backpack -> outputs/nano/model
#   bash scripts/quickstart.sh --model gpt2    # the GPT-2 baseline on the same budget -> outputs/nano-gpt2/model
#
# Extra arguments go to train/pretrain.py (e.g. --max_steps 30). Run time and output: README.md, "Quickstart".
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
install_extra train backpack_train accelerate datasets gensim

# The folder the trainer writes (its --output_dir, as it parses the same arguments).
output_dir=$(python -c 'import sys
from backpack_train.config import DataArguments, TrainArguments, parse_args
print(parse_args((DataArguments, TrainArguments), sys.argv[1:])[1].output_dir)' --config nano "$@")
# A rerun replaces its own earlier run (the trainer refuses a used folder unless told).
python train/pretrain.py --config nano --overwrite_output_dir true "$@"
python train/demo.py "$output_dir/model"

model="$output_dir/model"
cat <<NEXT

Next, on the model this made ($model); first \`. .venv/bin/activate\` if that is your environment:
NEXT
if python -c "import json, sys; sys.exit(json.load(open('$model/config.json'))['model_type'] != 'backpack-gpt2')"; then
  cat <<NEXT
  backpack senses $model science --top 8
  backpack explain $model "My nurse said that" --target he --contrast she --top 3
  backpack generate $model "The war" --topic sports --strength 3 --compare
NEXT
fi
cat <<NEXT
  python train/evaluate.py --model_path $model
  python demo/app.py $model        # the browser demo (pip install -e '.[demo]' first)
  bash scripts/test.sh             # the test suite
On a GPU, the paper's smallest size on OpenWebText (README.md, "Train on a GPU"):
  accelerate launch --config_file train/accelerate_configs/single_gpu.yaml train/pretrain.py --config micro --dataset Skylion007/openwebtext
NEXT
