#!/usr/bin/env bash
# The GPU figures of bench/RESULTS.md in one run (about 4-6 minutes on one H100/H200, at most 10).
#
#   bash bench/gpu_check.sh            # from the repo root, on the GPU machine, with the wheels of .whl/ at hand
#   bash bench/gpu_check.sh --smoke    # CPU-sized models, the same code paths (seconds)
#
# Installs the wheels in .whl/ (open_clip_torch, ftfy, wcwidth, bitsandbytes: what the GPU image lacks) into
# /tmp/site (GPU_CHECK_SITE) unless GPU_CHECK_INSTALL=0, imports pc_clip from the repo root, then runs each stage of
# bench/gpu_check.py in its own process under a time limit, so one failure or hang loses no other figure, and
# prints the table last. Results go to $OUT (default /tmp/gpu_check_out): env.json, finetune.json, generate.json,
# their logs, and gpu_results.md (markdown for bench/RESULTS.md). Extra arguments go to every stage
# (e.g. --ft-batch 256 --gen-tokens 64). Finetuning MFU is measured before and after on the same card in one run:
# the plain loop (fast paths off) and the loop with the paper profile's fast paths (fused attention, length
# buckets, compiled text tower; --ft-compile off / --ft-buckets 0 / --ft-fused 0 switch them off one by one).
# Limits: GPU_CHECK_FT_TIMEOUT (s, default 300), GPU_CHECK_GEN_TIMEOUT (210); with the wheel install and the
# report that bounds the whole script by about 10 minutes (typically 4-6).
set -u
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-${TMPDIR:-/tmp}/gpu_check_out}
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1
if [ "${GPU_CHECK_INSTALL:-1}" != 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=$SITE:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi (CPU run)"

stage() {  # stage NAME TIMEOUT ARGS...: run one stage in its own process, keep its log, never stop the script
  local name=$1 limit=$2; shift 2
  rm -f "$OUT/$name.json"
  timeout -k 10 "$limit" "$PY" bench/gpu_check.py "$name" --dir "$OUT" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || echo "stage $name ended with exit status $rc (124: timed out after ${limit} s)"
}
stage env 45 "$@"
stage finetune "${GPU_CHECK_FT_TIMEOUT:-300}" "$@"
stage generate "${GPU_CHECK_GEN_TIMEOUT:-210}" "$@"
timeout 60 "$PY" bench/gpu_check.py report --dir "$OUT" "$@"
