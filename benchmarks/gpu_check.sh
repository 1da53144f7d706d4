#!/usr/bin/env bash
# GPU check of issue 11, sized for <= 8 minutes on one H100/H200:
#   1. the suite's GPU-marked tests (FSDP via configs/trainer/fsdp.yaml: bf16 steps with KD from a cache, a sharded
#      checkpoint folder and an exact resume from it);
#   2. benchmarks/gpu_bench.py: tokens/s and MFU of a 1.9B-shape student (12 of its 24 layers) LM-only vs sparse KD
#      from top-0.95-100-shaped targets, fused vs unfused loss; an HF Llama-shaped bf16 teacher's cache-writing
#      throughput (tokens/s and the write-overhead ratio).
# Ends with `RESULT mfu_lm=... mfu_kd=... kd_over_lm=... write_ratio=...` (gpu_bench.py's line, plus tests=pass|fail).
#
#   benchmarks/gpu_check.sh              on a CUDA machine (record the output in benchmarks/RESULTS.md)
#   benchmarks/gpu_check.sh --dry-run    tiny shapes on CPU: checks the script itself (tests/test_gpu_check.py)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
DRY=""
if [[ "${1:-}" == "--dry-run" ]]; then DRY="--dry-run"; fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)

echo "== card"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
"$PY" -c "import torch; c = torch.cuda.is_available(); print('torch', torch.__version__, 'cuda', c, \
torch.cuda.get_device_name(0) if c else '')"

echo "== 1/2 GPU-marked tests"
if [[ -n "$DRY" ]]; then
    # Collected only: without a GPU they skip. Checks that the selection is not empty.
    "$PY" -m pytest -q -m gpu --collect-only tests/test_distributed.py -p no:cacheprovider | tail -2
    tests=dry
elif timeout 300 "$PY" -m pytest -q -m gpu -rs -p no:cacheprovider -s tests; then
    tests=pass
else
    tests=fail
fi

echo "== 2/2 student and teacher throughput"
out=$(mktemp)
timeout 240 "$PY" -m benchmarks.gpu_bench $DRY | tee "$out"
bench=$?
result=$(grep '^RESULT ' "$out" | tail -1)
rm -f "$out"
echo "== done in $(( $(date +%s) - start )) s"
if [[ $bench -ne 0 || -z "$result" ]]; then
    echo "RESULT bench=fail tests=$tests"
    exit 1
fi
echo "$result tests=$tests"
[[ "$tests" != fail ]]
