#!/bin/bash
# The accelerator checks of issue 21 in one run, for a machine with one CUDA GPU and a python3 that holds torch,
# transformers, pandas, matplotlib, typer and tqdm (loopscope itself from this checkout, no install):
#
#     OUT=/tmp/gpu bash benchmarks/gpu_session.sh
#
# 1. a smoke run of benchmarks/gpu_scale.py at a reduced width on the GPU (seconds: fails fast on a device bug);
# 2. benchmarks/device_agreement.py: every analyze table on the GPU against the CPU's (`default`, R = 32);
# 3. benchmarks/host_transfers.py: what one batch hands to the host, per line (CPU counts; the same code paths);
# 4. benchmarks/gpu_scale.py at Huginn-0125's exact shape: the analysis against its plain forwards, peak memory,
#    the paper's 256 questions extrapolated.
# Each step has its own time limit and writes its JSON/log under $OUT, so a failure in one leaves the others.
set -u
OUT=${OUT:-/tmp/gpu}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
DEV=${DEV:-cuda}  # DEV=cpu GPU_SCALE_ARGS="--width 192 --heads 2 --tokens 24 --prompts 2 -r 8": a dry run here
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import torch, transformers, sys; print(sys.version.split()[0], torch.__version__, transformers.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
} 2>&1 | tee "$OUT/machine.txt"
step() {  # name, limit (s), command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc $rc in $((SECONDS - t0)) s"
  tail -c 1500 "$OUT/$name.log"
  echo
}
step smoke 90 $PY benchmarks/gpu_scale.py --device $DEV --width 1056 --heads 11 --prompts 2 --tokens 64 -r 16 \
  --repeats 1 --json "$OUT/smoke.json"
step agreement 120 $PY benchmarks/device_agreement.py --device $DEV --json "$OUT/agreement.json"
step host_transfers 60 $PY benchmarks/host_transfers.py states
step gpu_scale ${GPU_SCALE_LIMIT:-270} $PY benchmarks/gpu_scale.py --device $DEV --repeats 2 \
  ${GPU_SCALE_ARGS:-} --json "$OUT/gpu_scale.json"
