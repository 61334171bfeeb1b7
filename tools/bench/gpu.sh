#!/usr/bin/env bash
# The accelerator benchmarks of issue 8 in one go, on one GPU (written for an H100, ~8 minutes):
#   1. tools/bench/mfu.py: SFT step MFU of the 1B Llama (llama-3.2-1b, random weights, bf16
#      compute, fp32 params + AdamW), batch 8 x 2048, cuDNN attention, remat dots, chunked
#      logits; retried at batch 4 if batch 8 runs out of memory. Target: >= 45% MFU.
#   2. tools/bench/decode.py: greedy decode of a random Qwen2-1.5B-shaped model in bf16,
#      jreason sampler and engine vs transformers `generate` on the same GPU, batch 1 and 64.
#   3. if time is left: the MFU run again with XLA attention, to see what cuDNN's is worth.
# Each command has its own timeout; logs, the BENCHMARKS.md rows the runs appended
# (benchmarks-new.md: append it to BENCHMARKS.md in the checkout) and versions go to $OUT
# (or ./gpu-bench-out when OUT is unset).
#
#   bash tools/bench/gpu.sh [WHEEL_DIR]
#
# WHEEL_DIR: wheels for Python packages the machine lacks, installed with
# `pip install --no-index --no-deps --target /tmp/site` when an import below fails. The 'cuda'
# image has jax (CUDA), flax, optax, orbax, torch and transformers but not grain, array-record
# and portpicker, which `jreason.train` imports (through jreason.data.pipeline). Fetch them once
# on a machine with pip (x86-64 wheels for the image's Python 3.12), from the repository root:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl grain==0.2.18 array-record==0.8.6 portpicker==1.6.0
#
# (4.4 MB; `.whl/` is git-ignored through .git/info/exclude), then run on the GPU machine
# `bash tools/bench/gpu.sh .whl` with `.whl` carried along. torch and transformers can be
# installed the same way if missing, but a CUDA torch wheel is far over a 64 MB carry.
set -u
cd "$(dirname "$0")/../.."
REPO=$PWD
OUT=${OUT:-$REPO/gpu-bench-out}
mkdir -p "$OUT"
BUDGET=${BUDGET:-480}  # seconds for the whole script; step 3 runs only if enough is left
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

missing() {
  "$PY" - <<'EOF'
import importlib.util
need = ["jax", "flax", "optax", "orbax.checkpoint", "grain", "array_record", "portpicker",
        "torch", "transformers", "safetensors", "yaml", "tqdm"]
print(" ".join(m for m in need if importlib.util.find_spec(m.split(".")[0]) is None))
EOF
}

ORIG_PYTHONPATH=${PYTHONPATH:-}
export PYTHONPATH=$REPO${ORIG_PYTHONPATH:+:$ORIG_PYTHONPATH}  # jreason from this checkout
miss=$(missing)
if [ -n "$miss" ]; then
  echo "missing: $miss"
  if [ -z "${1:-}" ] || ! ls "$1"/*.whl >/dev/null 2>&1; then
    echo "no wheel directory given (or it holds no .whl): see the header of $0" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$1"/*.whl || exit 2
  export PYTHONPATH=$REPO:/tmp/site${ORIG_PYTHONPATH:+:$ORIG_PYTHONPATH}
  miss=$(missing)
  [ -n "$miss" ] && { echo "still missing after installing $1: $miss" >&2; exit 2; }
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import sys, jax, flax, optax, torch, transformers as t; print(sys.version.split()[0], \
'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', \
torch.__version__, 'transformers', t.__version__); print(jax.devices())"
} 2>&1 | tee "$OUT/env.txt"
"$PY" -c "import jreason.train.sft, jreason.decode.engine" || { echo "jreason import failed" >&2; exit 2; }

lines_before=$(wc -l <BENCHMARKS.md)
run() {  # run SECONDS LOG CMD...: a timeout per command; the log also lands in $OUT
  local secs=$1 log=$2
  shift 2
  echo "== [$(date -u +%T), ${SECONDS}s] timeout ${secs}s: $*" | tee -a "$OUT/$log"
  timeout -k 10 "$secs" "$@" 2>&1 | tee -a "$OUT/$log"
  local rc=${PIPESTATUS[0]}
  echo "== rc $rc after ${SECONDS}s" | tee -a "$OUT/$log"
  return "$rc"
}

# 1. MFU of the 1B Llama. 95% of the GPU for XLA: fp32 params + Adam moments + grads are
# ~20 GB before activations.
MFU=(tools/bench/mfu.py --preset llama-3.2-1b --seq 2048 --attention cudnn --remat dots
  --logits-chunk 1024 --warmup 2 --steps 8 --record)
if ! XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 run 200 mfu.log "$PY" "${MFU[@]}" --batch 8; then
  if grep -qiE "RESOURCE_EXHAUSTED|out of memory|OOM" "$OUT/mfu.log"; then
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 run 160 mfu.log "$PY" "${MFU[@]}" --batch 4
  fi
fi

# 2. Decode, Qwen2-1.5B shape, bf16. torch shares the GPU, so XLA takes half of it, not 75%.
XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 run 270 decode.log "$PY" tools/bench/decode.py \
  --sizes 1.5b --dtype bfloat16 --batches 1 64 --reps 2

# 3. What cuDNN attention is worth: the same step with XLA's attention, if time is left.
if [ $((BUDGET - SECONDS)) -ge 150 ]; then
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 run $((BUDGET - SECONDS - 10)) mfu-xla.log "$PY" \
    tools/bench/mfu.py --preset llama-3.2-1b --seq 2048 --attention xla --remat dots \
    --logits-chunk 1024 --warmup 2 --steps 8 --record --batch 8
else
  echo "skipped the XLA-attention MFU run: $((BUDGET - SECONDS)) s left of $BUDGET"
fi

tail -n +$((lines_before + 1)) BENCHMARKS.md >"$OUT/benchmarks-new.md"
echo "done in ${SECONDS}s; new BENCHMARKS.md rows in $OUT/benchmarks-new.md"
