#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md and a short profile, on one H100 / H200, in BUDGET seconds
# (default 360), most important first; a step that would outrun the budget is cut short (its log kept):
#   bash scripts/gpu_bench.sh                 # logs and JSON under $OUT (default out/gpu_bench)
#   TESTS=1 BUDGET=560 bash scripts/gpu_bench.sh    # also the test suite (CPU-pinned, 8 workers) and a train.py run
# Peers that the machine lacks (trl, datasets) are taken from .whl/ when present: make it once on a
# machine with PyPI access with `bash scripts/gpu_wheels.sh`.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS BUDGET=${BUDGET:-360}
OUT=${OUT:-out/gpu_bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-packages .whl/*.whl \
    && export PYTHONPATH=/tmp/site-packages  # a 'site-packages' path: datasets' dill hashing pickles
  # modules elsewhere by value and fails on pyarrow's ("Can't pickle <class 'MonthDayNano'>")
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/log.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)
for m in ('trl', 'peft', 'datasets', 'flash_attn'):
    try: print(m, __import__(m).__version__)
    except ImportError: print(m, 'not installed')" | tee -a "$OUT/log.txt"
run() {  # run LIMIT CMD...: one command, its output kept, cut at LIMIT s or at the budget's end
  local limit=$1; shift
  local left=$((BUDGET - (SECONDS - START) - 5))
  (( left < limit )) && limit=$left
  if (( limit < 15 )); then echo "== skipped (budget spent): $*" | tee -a "$OUT/log.txt"; return; fi
  echo "== [$((SECONDS - START)) s, limit $limit s] $*" | tee -a "$OUT/log.txt"
  timeout -s INT -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT/log.txt"
}
B="$PY bench.py config/bench_llama1b.py"
run 150 $B --cases=sft,dpo,dpo_precomputed,simpo,kd,mix,alright --compare=True --json="$OUT/steps_1024.json"
if [[ "${TESTS:-0}" == 1 ]]; then  # the suite as a user on this machine runs it (it pins itself to the CPU)
  OMP_NUM_THREADS=2 run 170 $PY -m pytest -n 8 -q -p no:cacheprovider --durations=8 tests
  run 60 $PY train.py config/demo.py --out_dir=/tmp/gpu_demo --overwrite=True --max_iters=100 --eval_interval=50
fi
run 60 $PY bench.py config/bench_llama1b.py --mode=generate --batch_size=8 --prompt_len=128 --seq_len=256 --rounds=3 --json="$OUT/generate_1b.json"
run 40 $PY bench.py --mode=generate --dtype=bfloat16 --batch_size=8 --prompt_len=32 --seq_len=256 --rounds=3 --json="$OUT/generate_small.json"
run 90 $B --cases=sft,dpo,kd --lora_rank=16 --target_modules=q_proj,v_proj --compare=True --json="$OUT/lora.json"
run 90 $B --cases=dpo --compare=True --memory=True --iters=3 --json="$OUT/dpo_memory.json"    # peak memory vs TRL's
run 45 $B --cases=sft --seq_len=2048 --prompt_len=512 --json="$OUT/sft_2048.json"             # MFU
run 30 $PY bench.py --mode=memory --dtype=bfloat16 --json="$OUT/loss_memory.json"             # T=2048, V=128k
run 60 $B --profile=sft --warmup_iters=2                                                      # where the time goes
run 120 $B --cases=sft,dpo --compile=True --json="$OUT/compiled.json"                         # compiled blocks
echo "== done in $((SECONDS - START)) s" | tee -a "$OUT/log.txt"
