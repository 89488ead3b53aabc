#!/usr/bin/env bash
# On the lent GPU machine, from a copy of the working tree that carries .gpu_run/
# (made by scripts/prepare_gpu_run.py): install the carried wheels, point the harness
# (devtools/) at the carried ComfyUI and run bench/gpu.py, its output and a log in $OUT.
# Extra arguments go to bench/gpu.py. Stops itself after GPU_BENCH_TIMEOUT seconds
# (default 480) so that the device call returns what was measured by then.
set -uo pipefail
cd "$(dirname "$0")/.."
RUN=.gpu_run
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
SITE=${GPU_BENCH_SITE:-/tmp/site}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$RUN"/wheels/*.whl || exit
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} COMFYUI_PATH=$PWD/$RUN/comfyui PYTHONUNBUFFERED=1
cubiq=()
[ -d "$RUN/cubiq" ] && cubiq=(--cubiq "$RUN/cubiq")
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$OUT/nvidia-smi.csv" 2>&1
timeout "${GPU_BENCH_TIMEOUT:-480}" python3 bench/gpu.py --out "$OUT" "${cubiq[@]}" "$@" 2>&1 | tee "$OUT/gpu_bench.log"
