#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md and a short profile, on one H100 / H200, in about 5 minutes:
#   bash scripts/gpu_bench.sh                 # logs and JSON under $OUT (default out/gpu_bench)
# Peers that the machine lacks (trl, datasets) are taken from .whl/ when present: make it once on a
# machine with PyPI access with `bash scripts/gpu_wheels.sh`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/log.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)
for m in ('trl', 'peft', 'flash_attn'):
    try: print(m, __import__(m).__version__)
    except ImportError: print(m, 'not installed')" | tee -a "$OUT/log.txt"
run() {  # one bench command, its output kept; a failure does not stop the others
  echo "== $*" | tee -a "$OUT/log.txt"
  timeout "${LIMIT:-150}" $PY "$@" 2>&1 | tee -a "$OUT/log.txt"
}
B="bench.py config/bench_llama1b.py"
run $B --cases=sft,dpo,dpo_precomputed,kd,mix,alright --compare=True --json="$OUT/steps_1024.json"
run $B --cases=dpo --compare=True --memory=True --iters=3 --json="$OUT/dpo_memory.json"    # peak memory vs TRL's
run $B --cases=sft --seq_len=2048 --prompt_len=512 --json="$OUT/sft_2048.json"             # MFU
run $B --cases=sft,dpo,kd --lora_rank=16 --target_modules=q_proj,v_proj --compare=True --json="$OUT/lora.json"
run bench.py --mode=memory --dtype=bfloat16 --json="$OUT/loss_memory.json"                 # T=2048, V=128k
LIMIT=90 run $B --profile=sft --warmup_iters=2                                              # where the time goes
LIMIT=150 run $B --cases=sft,dpo --compile=True --json="$OUT/compiled.json"                 # compiled blocks
