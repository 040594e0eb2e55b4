#!/bin/bash
# fit_truth run 7 (session 6, helper 9): today's engine (core/kernels.py on) at today's auto-fit choices,
# the estimate pricing the kernels. One H200 call, run from /work/main's root with .dev9 (this branch's
# tree) and .whl carried: bash .dev9/bench/results/fit_truth_run7_device.sh (on a merged main: bash
# bench/results/fit_truth_run7_device.sh)
# Rows heaviest first (the deadline cuts the last ones): every full-context choice with a distinct plan
# (the 6 GB twin stands for 8 GB where the plans are the same: Qwen2.5-0.5B, Qwen2.5-3B, Qwen3-1.7B,
# SmolLM2-1.7B 4/6, Gemma-2-2B, Gemma-3-1B), four rows with SNUGTUNE_KERNELS=off (the kernels-off
# pricing on today's engine), the 4 GB presets' defaults, engine probes at choice / 0.85 (out of memory
# there: the choice is >= 85% of the longest that trains), Gemma-2-2B 8 GB also on packed rows.
set -u
[ -d /tmp/site/bitsandbytes ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
[ -d .dev9 ] && cd .dev9  # this branch shipped beside main (GPU.md); on a merged main, run from its root
python3 -c "import triton, torch; print('triton', triton.__version__, 'torch', torch.__version__, torch.cuda.get_device_name(0))"
mkdir -p /tmp/h9 $OUT/fit
ROWS=qwen2.5-1.5b:8gb:full,llama-3.2-1b:8gb:full,llama-3.2-3b:8gb:full,qwen2.5-1.5b:6gb:full,llama-3.2-1b:6gb:full
ROWS=$ROWS,qwen2.5-3b:6gb:full,llama-3.2-3b:6gb:full,qwen3-1.7b:6gb:full,gemma-3-1b:6gb:full,smollm2-1.7b:8gb:full
ROWS=$ROWS,qwen2.5-1.5b:4gb:full,llama-3.2-1b:4gb:full,qwen3-1.7b:4gb:full,qwen2.5-3b:4gb:full,llama-3.2-3b:4gb:full
ROWS=$ROWS,gemma-2-2b:4gb:full,gemma-3-1b:4gb:full,qwen2.5-0.5b:4gb:full,smollm2-1.7b:4gb:full
ROWS=$ROWS,gemma-3-1b:4gb:full:nokernels,qwen3-1.7b:4gb:full:nokernels,llama-3.2-1b:4gb:full:nokernels,llama-3.2-3b:6gb:full:nokernels
ROWS=$ROWS,qwen2.5-1.5b:4gb:preset,llama-3.2-1b:4gb:preset,qwen3-1.7b:4gb:preset,smollm2-1.7b:4gb:preset
ROWS=$ROWS,gemma-3-1b:4gb:preset,gemma-2-2b:4gb:preset,qwen2.5-3b:4gb:preset,llama-3.2-3b:4gb:preset,gemma-2-2b:8gb:full
PROBES=qwen2.5-1.5b:4gb:0.85,qwen2.5-3b:4gb:0.85,qwen3-1.7b:4gb:0.85,llama-3.2-1b:4gb:0.85,llama-3.2-3b:4gb:0.85
PROBES=$PROBES,llama-3.2-3b:6gb:0.85,llama-3.2-1b:6gb:0.85,qwen2.5-1.5b:6gb:0.85,llama-3.2-3b:8gb:0.85
PYTHONUNBUFFERED=1 FIT_ROOT=/tmp/h9/fit FIT_DEADLINE_S=${FIT_DEADLINE_S:-285} OUT=$OUT/fit PYTHONPATH=.:$PYTHONPATH \
  python3 bench/fit_truth.py --rows $ROWS --probes $PROBES --packed-rows gemma-2-2b:8gb:full \
  --bisect-cards none --steps 1 --jobs 44 --builders 5 --mem-gib 128 2>&1 | tee $OUT/fit/log
(cd /tmp/h9/fit/work && find . \( -name events.jsonl -o -name plan.json -o -name engine.log \) | tar czf $OUT/fit/runs.tgz -T -) || true
ls -la $OUT/fit
