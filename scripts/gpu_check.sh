#!/usr/bin/env bash
# The GPU checks (`make gpu-check`), under 5 minutes on one GPU:
#   1. the device-parametrised tests on CUDA (engine, float16 autocast + GradScaler, nccl group
#      of one process),
#   2. a one-epoch Multi-MNIST run on the GPU,
#   3. `mtopt bench --device cuda` on the three workloads,
#   4. the data-parallel equality test (gloo, 2 processes) beside them.
# Writes its outputs under ${OUT:-gpu_check}/; prints one table line per check.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
status=0
check() {  # check NAME COMMAND...: run, time, record pass/fail
    local name=$1; shift
    local start=$SECONDS
    if "$@" >"$OUT/$name.log" 2>&1; then r=pass; else r=FAIL; status=1; fi
    printf '| %s | %s | %d s |\n' "$name" "$r" $((SECONDS - start)) | tee -a "$OUT/summary.md"
}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__, torch.version.cuda)" \
    | tee "$OUT/device.txt" || exit 2
printf '| check | result | wall |\n|---|---|---|\n' > "$OUT/summary.md"
check device-tests "$PY" -m pytest -q -p no:cacheprovider tests/engine/test_devices.py -rs
check mnist-epoch "$PY" -m mtopt train --problem multi_mnist/cl_rr --method mgda_ub --epochs 1 \
    --device cuda --run-dir "$OUT/runs" --out "$OUT/mnist_epoch.json" --quiet
check bench-cuda "$PY" -m mtopt bench --device cuda --workloads lenet,mlp11,resnet3 --steps 20 \
    --warmup 5 --methods unitary,mgda,upgrad,upgrad#gramian,cagrad,nash_mtl,famo \
    --no-libmtl --out-dir "$OUT/bench"
check distributed "$PY" -m pytest -q -p no:cacheprovider tests/engine/test_distributed.py
exit $status
