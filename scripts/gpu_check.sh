#!/usr/bin/env bash
# Every GPU check in one run (issue 8), under ten minutes on one GPU: the CUDA tests, resnet20
# epochs on CIFAR-10-shaped data (50,000 images, batch 512) with sgd, dnq and compiled dnq,
# step-time ratios, instrument timings and Taylor-mode memory. Every stage runs even if one
# fails; results go to OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.log (see scripts/gpu_check.py).
# Usage: bash scripts/gpu_check.sh [OUT_DIR] [--budget SECONDS] [--only STAGE,...]
#        (PYTHON=... to choose the interpreter)
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi; fi
exec "$PY" scripts/gpu_check.py "$@"
