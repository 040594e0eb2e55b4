#!/bin/bash
# fit_truth run 5b: the device call (one H200), run from /work/main's root with .dev9 (this branch's
# HEAD) and .whl carried. Gemma-2-2B's 8 GB choice on packed rows of whole samples (6,494-6,799 tokens,
# as in run 4) with Plan.blocks_at's fix, beside the same choice on exact rows; Gemma-3-1B's 6 and 8 GB
# choices on exact rows (run 5 measured its 4 GB one 5.5% over the estimate).
set -u
[ -d /tmp/site/bitsandbytes ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
mkdir -p /tmp/h9
cd .dev9
PYTHONUNBUFFERED=1 FIT_ROOT=/tmp/h9/root5b FIT_DEADLINE_S=${FIT_DEADLINE_S:-150} PYTHONPATH=.:$PYTHONPATH \
  python3 bench/fit_truth.py --rows gemma-2-2b:8gb:full,gemma-3-1b:6gb:full,gemma-3-1b:8gb:full \
  --packed-rows gemma-2-2b:8gb:full --bisect-cards none --steps 1 --jobs 8 --builders 2 --mem-gib 60 2>&1 | tee $OUT/log
(cd /tmp/h9/root5b/work && find . \( -name events.jsonl -o -name plan.json \) | tar czf $OUT/runs.tgz -T -) || true
ls -la $OUT
