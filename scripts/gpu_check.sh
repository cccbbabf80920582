#!/usr/bin/env bash
# GPU checks (issue 2), one script, under ten minutes on one GPU:
#   1. the test suite's CUDA tests (pytest -m cuda);
#   2. resnet20 on synthetic CIFAR-100-shaped data (50,000 images), a few epochs with sgd and
#      with dnq, printing epoch times and images/s (bf16 autocast, channels_last);
#   3. the step-time ratios of every method to sgd on the GPU (benchmarks/bench_train.py).
# Usage: bash scripts/gpu_check.sh [OUT_DIR]     (PYTHON=... to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi; fi
OUT=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$OUT"
EPOCHS=${EPOCHS:-3}

"$PY" - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "no CUDA device visible: this script checks the GPU path"
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())
PYEOF

echo "== CUDA tests"
"$PY" -m pytest -m cuda tests -q -p no:cacheprovider

for method in sgd dnq; do
  echo "== resnet20, synthetic CIFAR-100 shape, method $method, $EPOCHS epochs"
  "$PY" -m dnq train --data synthetic:100:50000 --model resnet20 --method "$method" --epochs "$EPOCHS" \
      --batch-size 512 --lr 0.2 --out "$OUT/resnet20-$method" --overwrite --quiet
  "$PY" - "$OUT/resnet20-$method/metrics.jsonl" <<'PYEOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"  epoch {r['epoch'] + 1}: {r['time_s']:.2f} s, {r['images_per_s']:.0f} images/s, loss {r['train_loss']:.3f}")
PYEOF
done

echo "== torch.compile: resnet20 with dnq, 2 epochs"
"$PY" -m dnq train --data synthetic:100:50000 --model resnet20 --method dnq --epochs 2 --batch-size 512 --lr 0.2 \
    --compile --out "$OUT/resnet20-dnq-compile" --overwrite --quiet
"$PY" - "$OUT/resnet20-dnq-compile/metrics.jsonl" <<'PYEOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"  epoch {r['epoch'] + 1}: {r['time_s']:.2f} s, {r['images_per_s']:.0f} images/s (epoch 1 includes compilation)")
PYEOF

echo "== step-time ratios on the GPU"
"$PY" benchmarks/bench_train.py --models resnet20,resnet56 --batch-size 512 --rounds 10 --json "$OUT/bench_train_cuda.json"
