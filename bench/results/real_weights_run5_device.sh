#!/bin/bash
# Run 5 of bench/real_weights.py on the H200 (helper 10, session 6): the 5th of 5 back-to-back calls.
# Today's engine: core/kernels.py's fused Triton RMSNorm / GeGLU / rotary on by default (the plan's
# `kernels`), the LoRA sum in fp32; "-nokern" variants run with SNUGTUNE_KERNELS=off beside them.
#
# The payload (251.2 MB; a call carries at most 64 MiB with /work/main's 4.4 MB tree) is run 4's,
# built on the dev machine:
#   cat /work/gemma/p4/g.0* > gemma.gguf                       # sha256 a5fd3b62...6818
#   xz -T2 -6 -k gemma.gguf                                    # 237.6 MB
#   pip install --no-index --no-deps --target site /work/main/.whl/*.whl transformers-5.24.0-py3-none-any.whl
#     (bitsandbytes' CUDA libraries other than cuda130/132 removed; the image has transformers 5.17,
#     whose GGUF tokenizer is wrong for Gemma 3: core.gguf_source refuses it)
#   tar -cf - site | xz -6 > site.tar.xz                       # 13.6 MB
#   tar -cf payload.tar gemma.gguf.xz site.tar.xz pay.sha gemma.sha; split -b 50300000 -d -a 1 payload.tar pay.
# Calls 1-4 (carry .dev10/pN holding pay.N alone): mkdir -p /tmp/h10/p && cp .dev10/pN/pay.N /tmp/h10/p/
# Call 5 (carry .dev10/p4 = pay.4, .dev10/run = code.tar.xz (git archive of the branch) + this script):
#   H10_LIMIT=... bash .dev10/run/h10_run.sh
set -o pipefail
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
T=${H10_T:-/tmp/h10}
mkdir -p $T/p $T/code && cp .dev10/p4/pay.4 $T/p/ || exit 1
tar -xJf .dev10/run/code.tar.xz -C $T/code || exit 1
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
cd $T/code || exit 1
python3 -c "import transformers, bitsandbytes, peft, torch, triton; print(transformers.__version__, bitsandbytes.__version__, peft.__version__, torch.__version__, triton.__version__)" || exit 1
# (H10_VARIANTS= H10_EST= : the speed-alone runs only, e.g. with H10_SPEED_BY=200 H10_DEADLINE=200)
V=${H10_VARIANTS-sn-bf16-pack-nographs,sn-fp16-pack,sn-bf16-pack,sn-bf16-nopack-nographs,sn-fp16-nopack,plain-bf16,plain-fp16,sn-bf16-pack-nographs-seed2,sn-fp16-pack-seed2,sn-bf16-pack-nographs-nokern,sn-fp16-pack-nokern}
timeout ${H10_LIMIT:-300} python3 bench/real_weights.py --gguf $T/gemma.gguf --out $OUT --steps 200 --jobs 15 ${H10_EST---estimator} \
  --variants "$V" \
  --deadline-s ${H10_DEADLINE:-280} --speed --speed-steps 20 --speed-variants sn-bf16-pack-nographs,sn-fp16-pack \
  --speed-deadline-s ${H10_SPEED_BY:-250} 2>&1 | grep -v -E 'it/s\]|Warning|warnings.warn' | tee $OUT/h10_stdout.log
echo "rc=$?"
ls -l $OUT
