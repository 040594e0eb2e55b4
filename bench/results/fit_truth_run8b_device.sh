#!/bin/bash
# fit_truth run 8b (session 7, lead, merged main): the choices that moved after run 8 (the static mask no longer
# counted a kept block, which run 8 measured shared: SmolLM2-1.7B 8 GB keeps 16 blocks where run 8 kept 10, three
# 4 GB presets one more) and two more probes between Qwen2.5-3B 4 GB's 16,896 (trained) and 19,200 (out of memory).
# From /work/main's root with .whl carried: bash bench/results/fit_truth_run8b_device.sh   (~2.5 min on one H200)
set -u
[ -d /tmp/site/bitsandbytes ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
mkdir -p /tmp/lead $OUT/fit
PYTHONUNBUFFERED=1 FIT_ROOT=/tmp/lead/fit8b FIT_DEADLINE_S=${FIT_DEADLINE_S:-150} OUT=$OUT/fit PYTHONPATH=.:$PYTHONPATH \
  python3 bench/fit_truth.py \
  --rows smollm2-1.7b:8gb:full,qwen2.5-3b:4gb:full,qwen2.5-1.5b:4gb:preset,qwen3-1.7b:4gb:preset,smollm2-1.7b:4gb:preset \
  --probes qwen2.5-3b:4gb:0.80,qwen2.5-3b:4gb:0.83 \
  --bisect-cards none --steps 1 --jobs 12 --builders 4 --mem-gib 120 2>&1 | tee $OUT/fit/log
ls -la $OUT/fit
