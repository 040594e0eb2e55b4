#!/bin/bash
# Run 4 of bench/real_weights.py on the H200 (helper 10, session 5): the 4th of 4 back-to-back calls.
#
# The payload (251 MB: each call carries at most 64 MiB with the tree) was built on the dev machine:
#   cat /work/gemma/p4/g.0* > gemma.gguf                       # sha256 a5fd3b62...6818
#   xz -T2 -6 -k gemma.gguf                                    # 237.6 MB
#   python3 -m zipfile -e W site/  for W in /work/main/.whl/*.whl transformers-5.24.0-py3-none-any.whl
#     (bitsandbytes' libraries other than cpu/cuda130/cuda132 removed; the image's huggingface_hub,
#     tokenizers and regex meet 5.24's Requires-Dist, as in run 3)
#   tar -cf - site | xz -6 > site.tar.xz                       # 13.4 MB
#   tar -cf payload.tar gemma.gguf.xz site.tar.xz pay.sha gemma.sha; split -b 63000000 -d -a 1 payload.tar pay.
# Calls 1-3 (carry .dev10 holding pay.N alone): mkdir -p /tmp/h10/p && cp .dev10/pay.N /tmp/h10/p/
# Call 4 (carry .dev10 = pay.3, code.tar.xz = git archive of the branch, this script):
#   H10_LIMIT=... bash .dev10/h10_run.sh
set -o pipefail
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
T=/tmp/h10
mkdir -p $T/p $T/code && cp .dev10/pay.3 $T/p/ || exit 1
tar -xJf .dev10/code.tar.xz -C $T/code || exit 1
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
cd $T/code || exit 1
python3 -c "import transformers, bitsandbytes, peft, torch; print(transformers.__version__, bitsandbytes.__version__, peft.__version__, torch.__version__)" || exit 1
timeout ${H10_LIMIT:-300} python3 bench/real_weights.py --gguf $T/gemma.gguf --out $OUT --steps 200 --jobs 10 --estimator \
  --variants sn-bf16-pack-nographs,sn-fp16-pack,sn-bf16-pack-nographs-seed2,sn-fp16-pack-seed2,sn-bf16-pack-nographs-oldsum,sn-bf16-pack \
  --speed --speed-steps 20 --speed-variants sn-bf16-pack-nographs,sn-fp16-pack,sn-bf16-pack-nographs-guard \
  --speed-deadline-s ${H10_SPEED_BY:-230} 2>&1 | grep -v -E 'it/s\]|Warning|warnings.warn' | tee $OUT/h10_stdout.log
echo "rc=$?"
cp real_weights.log $OUT/ 2>/dev/null; ls -l $OUT
