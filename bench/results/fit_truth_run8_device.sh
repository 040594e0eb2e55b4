#!/bin/bash
# fit_truth run 8 (session 7, lead): the estimate with the kernels credited in kept blocks, one static
# mask a micro-batch (core/savers.py::_static_mask), the loss tail kernel's 2 bytes a logit, and the
# margin as a share of the per-step memory; the engine with the shared static mask. Run 7's rows at
# today's choices (heaviest first), engine probes at choice / 0.85 (out of memory there: the choice is
# >= 85% of the longest that trains) and, for the two 3B shapes on 4 GB, at / 0.75 and / 0.65 too (a
# bracket in one pass). From /work/main's root with .dev9 (the branch) and .whl carried:
#   bash .dev9/bench/results/fit_truth_run8_device.sh     (merged main: bash bench/results/fit_truth_run8_device.sh)
set -u
[ -d /tmp/site/bitsandbytes ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
[ -d .dev9 ] && cd .dev9
python3 -c "import triton, torch; print('triton', triton.__version__, 'torch', torch.__version__, torch.cuda.get_device_name(0))"
mkdir -p /tmp/lead $OUT/fit
ROWS=llama-3.2-3b:8gb:full,qwen2.5-1.5b:8gb:full,llama-3.2-1b:8gb:full,qwen2.5-1.5b:6gb:full,llama-3.2-1b:6gb:full
ROWS=$ROWS,qwen2.5-3b:6gb:full,llama-3.2-3b:6gb:full,qwen3-1.7b:6gb:full,gemma-3-1b:6gb:full,smollm2-1.7b:8gb:full
ROWS=$ROWS,qwen2.5-1.5b:4gb:full,llama-3.2-1b:4gb:full,qwen3-1.7b:4gb:full,qwen2.5-3b:4gb:full,llama-3.2-3b:4gb:full
ROWS=$ROWS,gemma-2-2b:4gb:full,gemma-3-1b:4gb:full,qwen2.5-0.5b:4gb:full,smollm2-1.7b:4gb:full
ROWS=$ROWS,gemma-3-1b:4gb:full:nokernels,qwen3-1.7b:4gb:full:nokernels,llama-3.2-1b:4gb:full:nokernels,llama-3.2-3b:6gb:full:nokernels
ROWS=$ROWS,qwen2.5-1.5b:4gb:preset,llama-3.2-1b:4gb:preset,qwen3-1.7b:4gb:preset,smollm2-1.7b:4gb:preset
ROWS=$ROWS,gemma-3-1b:4gb:preset,gemma-2-2b:4gb:preset,qwen2.5-3b:4gb:preset,llama-3.2-3b:4gb:preset,gemma-2-2b:8gb:full
PROBES=qwen2.5-3b:4gb:0.85,qwen2.5-3b:4gb:0.75,qwen2.5-3b:4gb:0.65,llama-3.2-3b:4gb:0.85,llama-3.2-3b:4gb:0.75,llama-3.2-3b:4gb:0.65
PROBES=$PROBES,qwen2.5-1.5b:4gb:0.85,qwen3-1.7b:4gb:0.85,llama-3.2-1b:4gb:0.85,llama-3.2-3b:6gb:0.85,llama-3.2-1b:6gb:0.85
PROBES=$PROBES,qwen2.5-1.5b:6gb:0.85,llama-3.2-3b:8gb:0.85
PYTHONUNBUFFERED=1 FIT_ROOT=/tmp/lead/fit FIT_DEADLINE_S=${FIT_DEADLINE_S:-300} OUT=$OUT/fit PYTHONPATH=.:$PYTHONPATH \
  python3 bench/fit_truth.py --rows $ROWS --probes $PROBES --packed-rows gemma-2-2b:8gb:full \
  --bisect-cards none --steps 1 --jobs 40 --builders 5 --mem-gib 128 2>&1 | tee $OUT/fit/log
(cd /tmp/lead/fit/work && find . \( -name events.jsonl -o -name plan.json -o -name engine.log \) | tar czf $OUT/fit/runs.tgz -T -) || true
ls -la $OUT/fit
