#!/bin/bash
# Run 6 of bench/real_weights.py on the H200 (helper 10, session 7; run by the lead on merged main): the 5th
# of 5 back-to-back calls. Modeled on run 5's (real_weights_run5_device.sh); what is new:
#   * the code is the call's own working tree (merged main: /work/main is what every call ships), or
#     H10_CODE: a directory or a .tar.xz (e.g. `git -C /work/main archive HEAD | xz > .gg/run/code.tar.xz`);
#   * the speed runs alone come FIRST (--speed-first; run 5's came last and were cut by its deadline):
#     bf16 and fp16 + guard, packed, no graphs, 25 steps each, tokens/s after the first 5;
#   * then, as run 5: the 11 learning variants x 200 steps and the 4 estimator probes (512 / 2,048 tokens x
#     micro-batch 1 / 4) as 15 concurrent processes (per-process peaks stay valid; their tokens/s are shared),
#     and 2 more probes in fp16 + the guard (2,048 x 4 and 512 x 1: the guard's fused-norm pricing), which
#     take the first 2 probes' places when they end (~35 s in).
#
# The payload is run 5's, staged at /work/main/.gg/p0..p4 (5 pieces of 50.3 MB: the GGUF xz'd, sha256
# a5fd3b62...6818, and site.tar.xz = bitsandbytes 0.50.2, pydantic, tomli-w, platformdirs, gguf and
# transformers 5.24 installed with --target; the image's transformers 5.17 reads Gemma 3's GGUF tokenizer
# wrongly and core.gguf_source refuses it). How it was built: real_weights_run5_device.sh's header.
#
# The lead, from /work/main (merged main, this file in it), 5 calls back to back (the machine stays warm
# ~30 s between calls; /tmp/h10r6 on it holds the pieces meanwhile):
#   calls 1-4, N = 0..3: carry [".gg/pN"], timeout_s 120:
#       mkdir -p /tmp/h10r6/p && cp .gg/pN/pay.N /tmp/h10r6/p/ && ls -l /tmp/h10r6/p
#   call 5: carry [".gg/p4"], timeout_s 460:
#       bash bench/results/real_weights_run6_device.sh
#   (a merged-main tarball instead of the tree: also carry ".gg/run" holding code.tar.xz and start the
#   command with H10_CODE=.gg/run/code.tar.xz; .gg/run/code.tar.xz today is run 5's code: replace it first)
# Expected (run 5's times; a process alone took ~50 s on that machine in fp16guard_speed run 1, ~35 s of it
# imports, loading and compiles): unpack ~25 s, GGUF conversion ~55 s, the 2 speed runs alone ~100 s, the 15
# concurrent ~215 s: ~395 s, a call of ~7 minutes. The script's limit is 400 s (H10_LIMIT), every child is killed
# 390 s after the script's start (H10_DEADLINE). Short of device time: H10_SPEED= (empty) drops the speed runs
# (~6 minutes, as run 5; set H10_DEADLINE=290 H10_LIMIT=300 and timeout_s 360 with it).
# Results in $OUT: real_weights.{json,md,log}, h10_stdout.log; copy them to bench/results/real_weights_run6.*
set -o pipefail
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
HERE=$PWD
T=${H10_T:-/tmp/h10r6}
CODE=${H10_CODE:-$HERE}
case "$CODE" in /*) ;; *) CODE=$HERE/$CODE ;; esac
mkdir -p $T/p || exit 1
cp .gg/p4/pay.4 $T/p/ || exit 1
ls -l $T/p
cd $T && cat p/pay.0 p/pay.1 p/pay.2 p/pay.3 p/pay.4 | tar -x || exit 1
sha256sum -c pay.sha || exit 1
T=$T python3 - <<'PY' || exit 1
import lzma, os, shutil, tarfile, threading, time
T = os.environ["T"]
t = time.time()
def gg():
    with lzma.open(T + "/gemma.gguf.xz") as f, open(T + "/gemma.gguf", "wb") as o:
        shutil.copyfileobj(f, o, 1 << 22)
th = threading.Thread(target=gg); th.start()
with tarfile.open(T + "/site.tar.xz") as tf:
    tf.extractall(T)
th.join()
print("unpacked in", round(time.time() - t, 1), "s")
PY
sha256sum -c gemma.sha || exit 1
rm -f $T/gemma.gguf.xz $T/p/pay.*
export PYTHONPATH=$T/site
case "$CODE" in
  *.tar.xz) mkdir -p $T/code && tar -xJf "$CODE" -C $T/code || exit 1
            CODE=$T/code ;;
esac
cd "$CODE" || exit 1
git -C "$CODE" log --oneline -1 2>/dev/null || echo "code: $CODE (no git history)"
[ -n "$H10_DRY" ] && { echo "dry run: payload and code ready in $CODE"; exit 0; }  # (the CPU check of this script)
python3 -c "import transformers, bitsandbytes, peft, torch, triton; print(transformers.__version__, bitsandbytes.__version__, peft.__version__, torch.__version__, triton.__version__)" || exit 1
V=${H10_VARIANTS-sn-bf16-pack-nographs,sn-fp16-pack,sn-bf16-pack,sn-bf16-nopack-nographs,sn-fp16-nopack,plain-bf16,plain-fp16,sn-bf16-pack-nographs-seed2,sn-fp16-pack-seed2,sn-bf16-pack-nographs-nokern,sn-fp16-pack-nokern}
# --deadline-s counts from the script's start (the GGUF conversion included): every child is killed there
# and what ran is written; the speed runs alone start only before --speed-deadline-s (from the conversion)
SPEED=${H10_SPEED---speed --speed-first --speed-steps 25 --speed-variants sn-bf16-pack-nographs,sn-fp16-pack --speed-deadline-s 170}
timeout ${H10_LIMIT:-400} python3 bench/real_weights.py --gguf $T/gemma.gguf --out $OUT --steps 200 --jobs 15 ${H10_EST---estimator --estimator-fp16 2048x4,512x1} \
  --variants "$V" --deadline-s ${H10_DEADLINE:-390} $SPEED \
  2>&1 | grep -v -E 'it/s\]|Warning|warnings.warn' | tee $OUT/h10_stdout.log
echo "rc=$?"
ls -l $OUT
