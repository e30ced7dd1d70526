#!/usr/bin/env bash
# The GPU checks in one run (for a lent CUDA machine without network): the CUDA tests, then
# `carrot bench perf --quick` on the GPU. Wheels for zarr and its needs travel in .whl/.
# Outputs land in $OUT (gpu.txt, gpu_tests.log, perf_gpu.json, perf_gpu.log).
set -uo pipefail
OUT=${OUT:-/tmp/carrot-gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, timm, zarr; print('torch', torch.__version__, 'timm', timm.__version__, 'zarr', zarr.__version__)" | tee -a "$OUT/gpu.txt"
timeout 180 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_gpu.py 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -15
timeout 330 python3 -c "
from benchmarks.perf import run, format_table, write_json
r = run(quick=True, device='cuda')
print(format_table(r))
write_json(r, '$OUT/perf_gpu.json')
" 2>&1 | tee "$OUT/perf_gpu.log" | tail -30
timeout 150 python3 -m benchmarks.finetune --device cuda --json "$OUT/finetune_gpu.json" 2>&1 \
  | tee "$OUT/finetune_gpu.log" | tail -8
