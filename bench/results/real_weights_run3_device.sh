#!/bin/bash
# Run 3 of bench/real_weights.py on the H200 (helper 10, session 4): the 4th of 4 back-to-back calls.
#
# The payload (251 MB: each call carries at most 64 MiB with the tree) was built here:
#   cat /work/gemma/p4/g.0* > gemma.gguf                       # sha256 a5fd3b62...6818
#   xz -T2 -6 -k gemma.gguf                                    # 237.6 MB
#   pip install --no-index --no-deps --target site /work/main/.whl/*.whl transformers-5.24.0-py3-none-any.whl
#     (cp312 manylinux; bitsandbytes' CUDA libraries other than cuda130/132 removed; the image's
#     huggingface_hub 1.33, tokenizers 0.23.2, regex 2026.9.3 meet 5.24's Requires-Dist)
#   tar -cf - site | xz -6 > site.tar.xz                       # 13.6 MB
#   tar -cf payload.tar gemma.gguf.xz site.tar.xz pay.sha gemma.sha; split -b 63000000 -d -a 1 payload.tar pay.
# Calls 1-3 (carry .dev10 holding pay.N alone): mkdir -p /tmp/h10/p && cp .dev10/pay.N /tmp/h10/p/
# Call 4 (carry .dev10 = pay.3, code/ = git archive of the branch, this script):
#   H10_LIMIT=540 H10_SPEED_BY=280 bash .dev10/h10_run.sh
set -o pipefail
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
T=/tmp/h10
mkdir -p $T/p && cp .dev10/pay.3 $T/p/ || exit 1
ls -l $T/p
cd $T && cat p/pay.0 p/pay.1 p/pay.2 p/pay.3 | tar -x || exit 1
sha256sum -c pay.sha || exit 1
python3 - <<'PY' || exit 1
import lzma, shutil, tarfile, threading, time
t = time.time()
def gg():
    with lzma.open("/tmp/h10/gemma.gguf.xz") as f, open("/tmp/h10/gemma.gguf", "wb") as o:
        shutil.copyfileobj(f, o, 1 << 22)
th = threading.Thread(target=gg); th.start()
with tarfile.open("/tmp/h10/site.tar.xz") as tf:
    tf.extractall("/tmp/h10")
th.join()
print("unpacked in", round(time.time() - t, 1), "s")
PY
sha256sum -c gemma.sha || exit 1
rm -f $T/gemma.gguf.xz $T/p/pay.*
export PYTHONPATH=$T/site
cd - >/dev/null && cd .dev10/code || exit 1
python3 -c "import transformers, bitsandbytes, peft, torch; print(transformers.__version__, bitsandbytes.__version__, peft.__version__, torch.__version__)" || exit 1
timeout ${H10_LIMIT:-540} python3 bench/real_weights.py --gguf $T/gemma.gguf --out $OUT --steps 200 --jobs 14 --estimator --speed --speed-steps 25 --speed-deadline-s ${H10_SPEED_BY:-420} 2>&1 | grep -v -E 'it/s\]|Warning|warnings.warn' | tee $OUT/h10_stdout.log
echo "rc=$?"
ls -l $OUT
