#!/bin/bash
# NOT RUN YET (written for the lead's merged-main device check, session 6): what run 7 left open.
# From main's root with .whl carried: bash bench/results/fit_truth_run7b_device.sh  (~3-4 min on one H200)
# - Llama-3.2-3B 8 GB at its choice (44,736 tokens): run 7's process ended without an error beside 24
#   other trials (host RAM); here with few trials beside it.
# - Qwen2.5-3B and Llama-3.2-3B 4 GB: the bisection for the longest length that trains (run 7's probes
#   at choice / 0.85 trained: 16,000 and 6,848), to say how far under 85% the two choices are.
# - The 8 GB probes run 7 skipped for time: Qwen2.5-1.5B at 128,512 tokens, Llama-3.2-1B at 99,008
#   (out of memory there: their choices are >= 85% of the longest that trains); last, the deadline
#   may cut them.
# Then: python bench/fit_truth.py --table $OUT/fit/fit_truth.json; copy to bench/results/fit_truth_run7b.*
set -u
[ -d /tmp/site/bitsandbytes ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
mkdir -p /tmp/lead $OUT/fit
PYTHONUNBUFFERED=1 FIT_ROOT=/tmp/lead/fit7b FIT_DEADLINE_S=${FIT_DEADLINE_S:-230} OUT=$OUT/fit PYTHONPATH=.:$PYTHONPATH \
  python3 bench/fit_truth.py \
  --rows llama-3.2-3b:8gb:full,qwen2.5-3b:4gb:full,llama-3.2-3b:4gb:full,llama-3.2-1b:8gb:full,qwen2.5-1.5b:8gb:full \
  --bisect-rows qwen2.5-3b:4gb,llama-3.2-3b:4gb --probes llama-3.2-1b:8gb:0.85,qwen2.5-1.5b:8gb:0.85 \
  --steps 1 --jobs 12 --builders 3 --mem-gib 120 2>&1 | tee $OUT/fit/log
ls -la $OUT/fit
