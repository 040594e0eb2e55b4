#!/bin/bash
# fit_truth run 5: the device call (one H200), run from /work/main's root with .dev9 (this branch's
# HEAD) and .whl carried. Every full-context choice trained at exactly its length, one optimizer step
# of 2 micro-batches; the real engine probed above the choices (6/8 GB: choice / 0.85; 4 GB: / 0.95,
# and Qwen2.5-3B / 0.85, 0.9, 0.95).
set -u
[ -d /tmp/site/bitsandbytes ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
mkdir -p /tmp/h9
cd .dev9
PYTHONUNBUFFERED=1 FIT_ROOT=/tmp/h9/root FIT_DEADLINE_S=${FIT_DEADLINE_S:-300} PYTHONPATH=.:$PYTHONPATH \
  python3 bench/fit_truth.py --rows qwen2.5-1.5b:8gb:full,llama-3.2-1b:8gb:full,qwen2.5-1.5b:6gb:full,llama-3.2-3b:8gb:full,llama-3.2-1b:6gb:full,qwen2.5-3b:8gb:full,qwen2.5-3b:6gb:full,qwen3-1.7b:6gb:full,qwen2.5-0.5b:4gb:full,gemma-3-1b:4gb:full,qwen2.5-1.5b:4gb:full,llama-3.2-1b:4gb:full,llama-3.2-3b:6gb:full,qwen3-1.7b:4gb:full,smollm2-1.7b:8gb:full,gemma-2-2b:8gb:full,gemma-2-2b:6gb:full,qwen2.5-3b:4gb:full,gemma-2-2b:4gb:full,llama-3.2-3b:4gb:full,smollm2-1.7b:4gb:full \
  --bisect-cards none --probes qwen2.5-1.5b:8gb:0.85,llama-3.2-1b:8gb:0.85,qwen2.5-1.5b:6gb:0.85,llama-3.2-1b:6gb:0.85,llama-3.2-3b:8gb:0.85,llama-3.2-3b:6gb:0.85,qwen2.5-3b:4gb:0.85,qwen2.5-3b:4gb:0.9,qwen2.5-3b:4gb:0.95,gemma-2-2b:4gb:0.95,llama-3.2-3b:4gb:0.95,qwen3-1.7b:4gb:0.95,llama-3.2-1b:4gb:0.95,qwen2.5-1.5b:4gb:0.95 \
  --steps 1 --jobs 48 --builders 4 --mem-gib 112 2>&1 | tee $OUT/log
(cd /tmp/h9/root/work && find . \( -name events.jsonl -o -name plan.json -o -name engine.log \) | tar czf $OUT/runs.tgz -T -) || true
ls -la $OUT
