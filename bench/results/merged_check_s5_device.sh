#!/bin/bash
# Session 5's merged-main check: the device call (one H200), run from main's root with .whl carried.
# Today's engine (the fused Triton kernels, the LoRA sum in fp32, the lean norm's rebuilt outputs,
# the plan's offload/tiling fixes) at auto-fit's 21 full-context choices of fit_truth run 5 (exact
# rows; two of them on packed rows too, and Gemma-3-1B, whose 4 GB row run 5 measured 3.46 GiB
# reserved under a 3.47 cap), beside the 12 GB Llama-3.1-8B auto-fit row that big_models run 4 left
# without a result. Both benches run at once: they use separate allocator caps per process.
set -u
[ -d /tmp/site/bitsandbytes ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
python3 -c "import triton, torch; print('triton', triton.__version__, 'torch', torch.__version__)"
mkdir -p /tmp/lead $OUT/fit $OUT/big
( BIG_ROOT=/dev/shm/lead/models BIG_DEADLINE_S=${BIG_DEADLINE_S:-180} OUT=$OUT/big PYTHONUNBUFFERED=1 PYTHONPATH=.:$PYTHONPATH \
  python3 bench/big_models.py --set run4 --only llama-3.1-8b --cards 12gb --name big_models_run5 > $OUT/big/log 2>&1 ) &
PYTHONUNBUFFERED=1 FIT_ROOT=/tmp/lead/fit FIT_DEADLINE_S=${FIT_DEADLINE_S:-180} OUT=$OUT/fit PYTHONPATH=.:$PYTHONPATH \
  python3 bench/fit_truth.py --rows qwen2.5-1.5b:8gb:full,llama-3.2-1b:8gb:full,qwen2.5-1.5b:6gb:full,llama-3.2-3b:8gb:full,llama-3.2-1b:6gb:full,qwen2.5-3b:8gb:full,qwen2.5-3b:6gb:full,qwen3-1.7b:6gb:full,qwen2.5-0.5b:4gb:full,gemma-3-1b:4gb:full,qwen2.5-1.5b:4gb:full,llama-3.2-1b:4gb:full,llama-3.2-3b:6gb:full,qwen3-1.7b:4gb:full,smollm2-1.7b:8gb:full,gemma-2-2b:8gb:full,gemma-2-2b:6gb:full,qwen2.5-3b:4gb:full,gemma-2-2b:4gb:full,llama-3.2-3b:4gb:full,smollm2-1.7b:4gb:full \
  --packed-rows gemma-2-2b:8gb:full,llama-3.2-3b:8gb:full \
  --bisect-cards none --steps 1 --jobs 48 --builders 4 --mem-gib 100 2>&1 | tee $OUT/fit/log
wait
# then alone on the GPU (GPU time per token is only read with nothing beside it): snugtune with and
# without the kernels, today's fp32 LoRA sum through the kernels' epilogue included
mkdir -p $OUT/gpu
PYTHONUNBUFFERED=1 PYTHONPATH=.:$PYTHONPATH python3 bench/gpu_time.py --engines snugtune --shapes qwen2.5-1.5b --extra none \
  --mem '' --steps 3 --deadline-s ${GPU_DEADLINE_S:-90} --name gpu_time_run3 --out $OUT/gpu 2>&1 | grep -v '^{' | tail -40
PYTHONUNBUFFERED=1 PYTHONPATH=.:$PYTHONPATH timeout 45 python3 bench/kernels_check.py --out $OUT/gpu > $OUT/gpu/kernels_check.log 2>&1; tail -5 $OUT/gpu/kernels_check.log
(cd /tmp/lead/fit/work && find . \( -name events.jsonl -o -name plan.json -o -name engine.log \) | tar czf $OUT/fit/runs.tgz -T -) || true
tail -40 $OUT/big/log
ls -la $OUT/fit $OUT/big
