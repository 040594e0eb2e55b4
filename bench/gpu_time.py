"""The GPU's own time per trained token: plain recipe, Unsloth and snugtune, in one device call.

On an H200 a 1.5B model's QLoRA step is bound by the host (Python, autograd and ~9,000 kernel
launches), so wall-clock ratios follow the machine's CPU. What transfers to a small card, which
is bound by its own arithmetic and memory, is the work the GPU does per token. This bench sums
every CUDA kernel's duration (torch.profiler, CUPTI) over a few optimizer steps and reports it
per 1,000 trained tokens, broken down by kind (matmul, dequantization, attention, loss,
elementwise, copies, optimizer) and by phase (forward, backward, recompute of checkpointed
blocks, optimizer), beside the wall-clock tokens/s of the same process.

    python bench/gpu_time.py                  # GPU: all engines, all shapes; $OUT/gpu_time_run1.{json,md,log}
    python bench/gpu_time.py --smoke          # CPU: tiny shape, CPU activities only (checks the bench, no numbers)
    python bench/gpu_time.py --unsloth-site /tmp/site   # where Unsloth's bundle is unpacked (its own process)

Each engine runs in its own process (Unsloth patches transformers on import). All processes load
at once; then the coordinator lets them measure one at a time, so no other process's kernels
share the GPU while one is profiled. Random-init models of the real shapes (speed does not depend
on weight values), random tokens, batch 1, LoRA r=16 alpha 32 on all seven projections, paged
8-bit AdamW. The plain recipe and Unsloth run uncapped (as in bench/run.py); snugtune runs under
the allocator cap of the card it targets (its plan decides checkpointing from it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
GiB = 2**30

# Llama-3.1-8B's real config numbers (meta-llama/Llama-3.1-8B config.json), written out here so the
# bench does not depend on the catalog. RoPE's llama3 frequency scaling is left out: it changes the
# rotary frequencies, computed once, not the work per token.
LLAMA31_8B = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
                  head_dim=128, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5)
EXTRA_SHAPES = {"llama-3.1-8b": LLAMA31_8B}

# shape -> (sequence lengths, snugtune's allocator cap in GiB: the card it stands for, less its CUDA context)
RUNS = {"qwen2.5-1.5b": ([1024, 4096], 3.65), "llama-3.1-8b": ([2048], 11.65)}
SMOKE_RUNS = {"tiny": ([128], None)}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# H200 bf16 dense matrix rate: the datasheet's ~989 TFLOP/s, and what an 8192^3 bf16 product reached
# through PyTorch on these machines (/work/.library/device/KINDS.md, 2026-10-28 / 11-04: 769-798).
PEAK_SPEC_TFLOPS = 989.0
PEAK_MEASURED_TFLOPS = 790.0


def shape_cfg(name: str) -> dict:
    if name in EXTRA_SHAPES:
        return dict(EXTRA_SHAPES[name])
    sys.path.insert(0, HERE)
    from plain_recipe import SHAPES

    return dict(SHAPES[name])


# ---------------------------------------------------------------------------------------
# FLOPs per token
# ---------------------------------------------------------------------------------------

def flops_per_token(cfg: dict, seq: int, rank: int = 16) -> dict:
    """Matmul FLOPs per trained token, written out.

    N = L x (H*Hq*D + 2*H*Hkv*D + Hq*D*H + 3*H*I) + V*H: every weight on the gradient's path (the
    seven projections of each block and the output layer; the input embedding is a lookup).
    Attention (causal, each token sees on average T/2 keys): forward QK^T and PV take 2*L*Hq*D*T
    per token, backward twice that.
      convention (the brief's, as MFU is usually quoted): 6*N + 6*L*Hq*D*T
      QLoRA's real need: the base is frozen, so no weight gradients for it: forward 2N, backward
      (activation gradients) 2N, plus the adapters' 6*N_lora; no recompute counted:
      4*N + 6*N_lora + 6*L*Hq*D*T
    """
    H, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    Hq, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg.get("head_dim") or H // Hq
    I, V = cfg["intermediate_size"], cfg["vocab_size"]
    per_layer = H * Hq * D + 2 * H * Hkv * D + Hq * D * H + 3 * H * I
    N = L * per_layer + V * H
    lora = L * rank * ((H + Hq * D) + 2 * (H + Hkv * D) + (Hq * D + H) + 3 * (H + I))
    attn = 6 * L * Hq * D * seq
    return {"N": N, "N_lora": lora, "attn_per_token": attn, "conv_6N": 6 * N + attn,
            "qlora_4N": 4 * N + 6 * lora + attn,
            "formula": "6N + 6*L*Hq*D*T (convention); 4N + 6*N_lora + 6*L*Hq*D*T (frozen base, no recompute)"}


# ---------------------------------------------------------------------------------------
# Kernel classification
# ---------------------------------------------------------------------------------------

KINDS = ["matmul", "dequant", "attention", "loss", "elementwise", "copies", "optimizer"]
_MM_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm",
           "aten::addbmm", "aten::_addmm_activation"}
_COPY_OPS = {"aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::to",
             "aten::index_select", "aten::cat", "aten::_foreach_copy_"}
_LOSS_MARKS = ("_chunkedlinearce", "cross_entropy", "log_softmax", "nll_loss", "logsoftmax", "nllloss",
               "crossentropy", "cce", "fused_linear_cross", "forcausallmloss", "fused_ce", "ce_loss", "fusedloss",
               "fused_loss")
_ATTN_MARKS = ("scaled_dot_product", "flash", "fmha", "attention", "sdpa", "_efficient_attention")


def kind_of(kernel: str, ops: list[str]) -> str:
    """One kernel's kind from its name and the names of the ops around it, innermost first.

    `ops` is empty for kernels no op launched (a CUDA graph's replay): then the name alone decides
    (a graph's loss kernels are generic reductions and count as elementwise)."""
    k = kernel.lower()
    low = [o.lower() for o in ops]
    inner = low[0] if low else ""
    if any(o.startswith("optimizer.") or o == "gt.opt" for o in low) or "optimizer" in k:
        return "optimizer"
    if "dequant" in k or any("dequantize" in o for o in low):
        return "dequant"
    if any(m in k for m in _ATTN_MARKS) or any(any(m in o for m in _ATTN_MARKS) for o in low[:3]):
        return "attention"
    if any(g in k for g in ("gemm", "nvjet", "xmma", "cutlass", "splitk", "cublas", "matmul", "wgmma")) \
            or inner in _MM_OPS:
        return "matmul"
    if any(any(m in o for m in _LOSS_MARKS) for o in low) or any(m in k for m in ("cross_entropy", "_cce_",
                                                                                    "nll_loss", "softmax", "_ce_tail")):
        return "loss"
    if k.startswith(("memcpy", "memset")) or "copy" in k or inner in _COPY_OPS:
        return "copies"
    return "elementwise"


def phase_of(ops: list[str], thread_main: bool) -> str:
    low = set(ops)
    if "gt.opt" in low or any(o.startswith("Optimizer.") for o in ops):
        return "optimizer"
    if "gt.fwd" in low:
        return "forward"
    if "gt.block" in low:  # a decoder block's forward run again inside backward: checkpointing
        return "recompute"
    if "gt.graph" in low:
        return "graph replay"
    return "backward"


def summarize(prof, device: str, tokens: int, steps: int) -> dict:
    """Summed kernel time by kind and phase, per 1,000 tokens. On the CPU (smoke), each leaf op's
    self CPU time stands in for a kernel (the bench's plumbing is what is checked)."""
    from torch.autograd import DeviceType

    evts = prof.events()
    by_kind = {k: 0.0 for k in KINDS}
    by_phase: dict[str, float] = {}
    top: dict[str, list] = {}
    n = 0
    unlinked_us = 0.0

    def ancestors(e):
        names = []
        while e is not None:
            names.append(e.name)
            e = e.cpu_parent
        return names

    def add(name, us, ops):
        nonlocal n
        kd = kind_of(name, ops)
        ph = phase_of(ops, True)
        by_kind[kd] += us
        by_phase[ph] = by_phase.get(ph, 0.0) + us
        t = top.setdefault(name[:90], [0.0, 0, kd])
        t[0] += us
        t[1] += 1
        n += 1

    if device == "cuda":
        # each kernel (and memcpy/memset) once, with the op that launched it: the op whose
        # correlation id the kernel links to (torch's own rule for FunctionEvent.kernels)
        ops_by_id = {e.id: e for e in evts if e.device_type == DeviceType.CPU and not e.is_async}
        dev_evts = [e for e in evts if e.device_type == DeviceType.CUDA]
        if dev_evts and not hasattr(dev_evts[0], "linked_correlation_id"):
            return _summarize_by_kernels(evts, tokens, steps, ancestors)
        for e in evts:
            if e.device_type != DeviceType.CUDA or getattr(e, "is_user_annotation", False):
                continue
            op = ops_by_id.get(getattr(e, "linked_correlation_id", 0) or -1)
            us = e.time_range.elapsed_us()
            if op is None:  # no op launched it: a CUDA graph's replay
                unlinked_us += us
            add(e.name, us, ancestors(op) if op is not None else ["gt.graph"])
    else:
        for e in evts:
            if e.device_type != DeviceType.CPU or e.name.startswith("gt.") or e.self_cpu_time_total <= 0:
                continue
            add(e.name, e.self_cpu_time_total, ancestors(e))
    summed = sum(by_kind.values())
    per_k = 1000.0 / tokens
    top_list = sorted(([name, round(v[0] / 1000 * per_k, 3), v[1] // max(steps, 1), v[2]] for name, v in top.items()),
                      key=lambda r: -r[1])[:12]
    return {
        "gpu_ms_per_1k_tokens": round(summed / 1000 * per_k, 3),
        "unlinked_ms_per_1k": round(unlinked_us / 1000 * per_k, 3),
        "kernels_per_step": n // max(steps, 1),
        "by_kind_ms_per_1k": {k: round(v / 1000 * per_k, 3) for k, v in by_kind.items()},
        "by_phase_ms_per_1k": {k: round(v / 1000 * per_k, 3) for k, v in sorted(by_phase.items())},
        "top_kernels": top_list,
    }


def _summarize_by_kernels(evts, tokens, steps, ancestors) -> dict:
    """Older torch (no linked_correlation_id on FunctionEvent): the kernels each op claimed
    (FunctionEvent.kernels), and what no op claimed (graph replays) by name."""
    from collections import Counter

    from torch.autograd import DeviceType

    by_kind = {k: 0.0 for k in KINDS}
    by_phase: dict[str, float] = {}
    claimed: Counter = Counter()
    top: dict = {}
    n = 0
    for e in evts:
        if e.device_type != DeviceType.CPU or not e.kernels:
            continue
        ops = ancestors(e)
        for kern in e.kernels:
            kd, ph = kind_of(kern.name, ops), phase_of(ops, True)
            by_kind[kd] += kern.duration
            by_phase[ph] = by_phase.get(ph, 0.0) + kern.duration
            claimed[kern.name] += kern.duration
            t = top.setdefault((kern.name[:90], kd), [0.0, 0])
            t[0] += kern.duration
            t[1] += 1
            n += 1
    allk: Counter = Counter()
    for e in evts:
        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
            allk[e.name] += e.time_range.elapsed_us()
    unl = 0.0
    for name, us in allk.items():
        rest = us - claimed.get(name, 0.0)
        if rest > 0.5:
            kd = kind_of(name, ["gt.graph"])
            by_kind[kd] += rest
            by_phase["graph replay"] = by_phase.get("graph replay", 0.0) + rest
            unl += rest
            top.setdefault((name[:90], kd), [0.0, 0])[0] += rest
    per_k = 1000.0 / tokens
    top_list = sorted(([k[0], round(v[0] / 1000 * per_k, 3), v[1] // max(steps, 1), k[1]] for k, v in top.items()),
                      key=lambda r: -r[1])[:15]
    return {"gpu_ms_per_1k_tokens": round(sum(by_kind.values()) / 1000 * per_k, 3),
            "unlinked_ms_per_1k": round(unl / 1000 * per_k, 3), "kernels_per_step": n // max(steps, 1),
            "by_kind_ms_per_1k": {k: round(v / 1000 * per_k, 3) for k, v in by_kind.items()},
            "by_phase_ms_per_1k": {k: round(v / 1000 * per_k, 3) for k, v in sorted(by_phase.items())},
            "top_kernels": top_list, "summary_path": "FunctionEvent.kernels"}


# ---------------------------------------------------------------------------------------
# Workers: one engine, one shape, one process
# ---------------------------------------------------------------------------------------

def emit(**kw):
    print("@@ " + json.dumps(kw), flush=True)


def mark_blocks(model) -> int:
    """Wrap the parts of every decoder block (attention, MLP, norms) in a profiler range, so that a
    block's work seen inside backward is counted as recompute. The parts, not the block: transformers
    >= 5.2x checkpoints the class's original forward, which an instance wrapper on the block would not
    see again in the recompute; every engine calls the parts through their modules. Runs after
    snugtune's savers are installed (its kernels and MLP tiling patch these parts and leave patched
    ones alone), around whatever forward a part has; idempotent. The marker carries `_snug_orig`, so
    uninstall_savers removes it with the patches under it (Snug.install marks again)."""
    from torch.profiler import record_function

    n = 0
    for mod in model.modules():
        if not type(mod).__name__.endswith("DecoderLayer"):
            continue
        for child in mod.children():
            f = child.__dict__.get("forward")
            if f is not None and getattr(f, "_gt_mark", False):
                continue
            orig = child.forward

            def fwd(*a, _orig=orig, **k):
                with record_function("gt.block"):
                    return _orig(*a, **k)

            fwd._gt_mark = True
            fwd._snug_orig = orig
            child.forward = fwd
            n += 1
    return n


def load_plain_model(path, dev):
    sys.path.insert(0, HERE)
    from plain_recipe import load_plain

    m = load_plain(path, dev)
    mark_blocks(m)
    return m


def load_unsloth_model(path, seq_max):
    import torch
    from unsloth import FastLanguageModel

    m, _ = FastLanguageModel.from_pretrained(model_name=path, max_seq_length=max(seq_max, 2048), dtype=torch.bfloat16,
                                             load_in_4bit=True, local_files_only=True)
    m = FastLanguageModel.get_peft_model(m, r=16, lora_alpha=32, lora_dropout=0, bias="none", target_modules=TARGETS,
                                         use_gradient_checkpointing="unsloth", random_state=0)
    m.train()
    mark_blocks(m)
    return m


class Snug:
    """snugtune's savers on a peft model, re-planned per sequence length and variant."""

    def __init__(self, path, dev, cap):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        sys.path.insert(0, REPO)
        sys.path.insert(0, HERE)
        from plain_recipe import quant_config

        from core import savers

        self.path, self.dev, self.cap = path, dev, cap
        m = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant_config(), dtype=torch.bfloat16,
                                                 device_map={"": 0 if dev == "cuda" else "cpu"})
        savers.prepare_for_kbit_training(m, True)
        torch.manual_seed(1234)
        self.m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                              target_modules=TARGETS))
        self.m.train()
        self.graphs = None

    def install(self, seq, keep=None, kernels=True, cap=None):
        from core import savers

        sys.path.insert(0, HERE)
        from trial import plan_for

        savers.uninstall_savers(self.m)
        old = os.environ.pop("SNUGTUNE_KEEP_LAYERS", None)
        if keep is not None:
            os.environ["SNUGTUNE_KEEP_LAYERS"] = str(keep)
        # the plan reads SNUGTUNE_KERNELS (core.plan._kernels): off = transformers' norms / GLU / rotary
        os.environ["SNUGTUNE_KERNELS"] = "on" if kernels else "off"
        try:
            plan = plan_for(self.path, seq, cap or self.cap, "auto", False, self.dev)
        finally:
            os.environ.pop("SNUGTUNE_KEEP_LAYERS", None)
            if old is not None:
                os.environ["SNUGTUNE_KEEP_LAYERS"] = old
        applied = savers.install_savers(self.m, plan)
        mark_blocks(self.m)
        return applied


def worker(a: dict) -> int:
    engine, shape, root = a["engine"], a["shape"], a["root"]
    if engine == "unsloth":
        os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
        os.environ["HF_HUB_OFFLINE"] = "1"
        import unsloth  # noqa: F401  (must precede transformers)
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    path = os.path.join(root, shape)
    seqs, cap = a["seqs"], a.get("cap")
    t_load = time.time()
    if engine == "plain":
        m = load_plain_model(path, dev)
        snug = None
    elif engine == "unsloth":
        m = load_unsloth_model(path, max(seqs))
        snug = None
    else:
        snug = Snug(path, dev, cap)
        m = snug.m
        if dev == "cuda" and cap:  # after loading (the load's transient shards are no part of training)
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(cap * GiB / total)
    params = [p for p in m.parameters() if p.requires_grad]
    if dev == "cuda":
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW8bit(params, lr=1e-4)
    else:
        opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = m.config.vocab_size
    emit(part="loaded", engine=engine, shape=shape, load_s=round(time.time() - t_load, 1),
         trainable=sum(p.numel() for p in params))
    if a.get("wait"):
        print("@@ready", flush=True)
        if sys.stdin.readline().strip() != "go":
            return 0
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    g = torch.Generator(device=dev).manual_seed(0)
    lo = 5 if engine == "unsloth" else 0  # Unsloth's script keeps the first ids (special tokens) out
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    W, N, Pn = a.get("warmup", 2), a.get("steps", 4), a.get("prof_steps", 2)

    # (seq, label, keep, graphs, kernels, allocator cap or None = the shape's)
    variants = []
    for seq in seqs:
        if engine == "snugtune":
            variants.append((seq, "normal", None, False, True, None))
            if dev == "cuda":
                variants.append((seq, "graphs", None, True, True, None))
            if a.get("kernels_off", True):
                variants.append((seq, "normal, without the kernels", None, False, False, None))
            if seq == seqs[0] and a.get("extra", True):
                variants.append((seq, "normal, every block checkpointed", 0, False, True, None))
                variants.append((seq, "normal, before this pass (REUSE_IN_BACKWARD off)", "before", False, True, None))
        else:
            variants.append((seq, "", None, False, True, None))
    if engine == "snugtune" and a.get("mem_seq"):
        # peak memory with and without the kernels at an auto-fit choice, under its allocator cap
        for on in (True, False):
            variants.append((a["mem_seq"], "memory, " + ("kernels" if on else "without the kernels"), None, False, on,
                             a["mem_cap"]))

    for seq, variant, keep, use_graphs, kernels_on, vcap in variants:
        tag = dict(engine=engine, shape=shape, seq=seq, variant=variant)
        if time.time() > a.get("deadline", 1e18):
            emit(part="error", **tag, error="skipped: the call's deadline")
            continue
        mem_only = vcap is not None
        try:
            if snug is not None:
                from core import savers

                if dev == "cuda" and (vcap or cap):
                    total = torch.cuda.get_device_properties(0).total_memory
                    torch.cuda.set_per_process_memory_fraction((vcap or cap) * GiB / total)
                savers.REUSE_IN_BACKWARD = keep != "before"
                applied = snug.install(seq, None if keep == "before" else keep, kernels=kernels_on, cap=vcap)
            else:
                applied = None
            graphs = None
            if use_graphs:
                from core.graphs import CudaGraphStep

                graphs = CudaGraphStep(m, forward_ctx=lambda: torch.autocast("cuda", dtype=torch.bfloat16))

            def step(ids, prof_ranges=True):
                batch = {"input_ids": ids, "labels": ids}
                loss = graphs.step(batch) if graphs is not None else None
                if loss is None:
                    ctx = torch.autocast(dev, dtype=torch.bfloat16) if snug is not None else _null()
                    with record_function("gt.fwd"), ctx:
                        out = m(**batch)
                    out.loss.backward()
                    loss = out.loss.detach()
                with record_function("gt.opt"):
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                return loss

            def ids_():
                return torch.randint(lo, vocab, (1, seq), device=dev, generator=g)

            if dev == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            # the memory variants: one warm-up and two steps (the first compiles the kernels), no profile
            w_, n_ = (1, 2) if mem_only else (W + (2 if use_graphs else 0), N)
            for _ in range(w_):  # graphs: 2 eager warm-ups, then the capture
                step(ids_())
            sync()
            t0 = time.perf_counter()
            loss = None
            for _ in range(n_):
                loss = step(ids_())
            sync()
            dt = time.perf_counter() - t0
            peak = torch.cuda.max_memory_reserved() / GiB if dev == "cuda" else None
            peak_a = torch.cuda.max_memory_allocated() / GiB if dev == "cuda" else None
            if mem_only:
                s = {"gpu_ms_per_1k_tokens": None, "kernels_per_step": None, "by_kind_ms_per_1k": {},
                     "by_phase_ms_per_1k": {}}
            else:
                with profile(activities=acts) as prof:
                    for _ in range(Pn):
                        step(ids_())
                    sync()
                s = summarize(prof, dev, Pn * seq, Pn)
            res = dict(part="result", **tag, tok_s=round(n_ * seq / dt, 1), s_per_step=round(dt / n_, 4),
                       peak_reserved_gib=round(peak, 3) if peak is not None else None,
                       peak_allocated_gib=round(peak_a, 3) if peak_a is not None else None, loss=float(loss),
                       cap_gib=vcap or cap, applied=applied, cuda_graphs=graphs.status if graphs is not None else None,
                       **s)
            if graphs is not None:
                graphs.release("variant done")
            emit(**res)
        except Exception as e:  # one variant's failure must not cost the others
            import traceback

            emit(part="error", **tag, error=f"{type(e).__name__}: {str(e)[:300]}",
                 tb=traceback.format_exc()[-1200:])
            opt.zero_grad(set_to_none=True)
        finally:
            if dev == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
    print("@@done", flush=True)
    return 0


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


# ---------------------------------------------------------------------------------------
# Coordinator
# ---------------------------------------------------------------------------------------

def build(shapes: list[str], root: str, dev: str) -> None:
    """Random-init models of the real shapes, saved once in bf16 (+ a tiny tokenizer for Unsloth)."""
    import gc

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    for name in shapes:
        path = os.path.join(root, name)
        if os.path.exists(os.path.join(path, "config.json")):
            continue
        kw = shape_cfg(name)
        mt = kw.pop("model_type")
        cfg = AutoConfig.for_model(mt, **kw)
        torch.manual_seed(0)
        t0 = time.time()
        with torch.device(dev):
            m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        m.save_pretrained(path)
        del m
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
        _add_tokenizer(path)
        print(f"built {name} in {time.time() - t0:.0f} s", flush=True)


def _add_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3, "a": 4}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)


class _Lines:
    """A worker's output lines, drained by a thread (a worker never blocks on a full pipe while the
    coordinator reads another one); iterating yields them in order and ends at the worker's exit."""

    def __init__(self, p):
        import queue
        import threading

        self.p = p
        self.q: "queue.Queue" = queue.Queue()

        def pump():
            for line in p.stdout:
                self.q.put(line)
            self.q.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def __iter__(self):
        while True:
            line = self.q.get()
            if line is None:
                self.q.put(None)  # stays ended for the next reader
                return
            yield line

    def go(self):
        try:
            self.p.stdin.write("go\n")
            self.p.stdin.flush()
        except (BrokenPipeError, OSError):
            pass


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny shape, CPU activities (no numbers)")
    ap.add_argument("--engines", default="plain,snugtune,unsloth")
    ap.add_argument("--shapes", default=",".join(RUNS))
    ap.add_argument("--unsloth-site", default=os.environ.get("UNSLOTH_SITE", "/tmp/site"),
                    help="PYTHONPATH entry with Unsloth's bundle, for its process only")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="timed steps (wall clock, no profiler)")
    ap.add_argument("--prof-steps", type=int, default=1, help="profiled steps")
    ap.add_argument("--deadline-s", type=float, default=210,
                    help="no variant starts after this many seconds (the device call's budget)")
    ap.add_argument("--extra", choices=["first", "all", "none"], default="first",
                    help="snugtune's extra variants (every block checkpointed; before the kernel cuts) "
                    "at the first shape's first length, or at every shape's, or none")
    ap.add_argument("--no-kernels-off", action="store_true",
                    help="leave out snugtune's 'without the kernels' variant (SNUGTUNE_KERNELS=off) at each length")
    ap.add_argument("--mem", default="qwen2.5-1.5b:26176:3.47",
                    help="SHAPE:TOKENS:CAP_GIB: peak memory with and without the kernels at that length under that "
                    "allocator cap (default: fit_truth run 4's auto-fit choice for Qwen2.5-1.5B on a 4 GB card, "
                    "budget 3.82 GiB less 0.35 context); '' for none")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"))
    ap.add_argument("--name", default="gpu_time_run4")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--build", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    if args.build:
        b = json.loads(args.build)
        build(b["shapes"], b["root"], b["dev"])
        return 0

    t_start = time.time()
    # --shapes none: no speed rows, only --mem's memory rows
    if args.smoke:
        runs = {} if args.shapes == "none" else dict(SMOKE_RUNS)
    else:
        runs = {s: RUNS[s] for s in args.shapes.split(",") if s and s != "none"}
    mem = None
    if args.smoke:
        mem = ("tiny", 256, 0)
    elif args.mem:
        ms, mt, mc = args.mem.split(":")
        mem = (ms, int(mt), float(mc))
    if mem and mem[0] not in runs:  # the memory rows alone for a shape not measured for speed in this call
        runs[mem[0]] = ([], {**RUNS, **SMOKE_RUNS}[mem[0]][1])
    engines = [e for e in args.engines.split(",") if e]
    if args.smoke:
        engines = [e for e in engines if e != "unsloth"]  # Unsloth needs CUDA
    os.makedirs(args.out, exist_ok=True)
    root = tempfile.mkdtemp(prefix="gt-models-")
    log = open(os.path.join(args.out, f"{args.name}.log"), "w")

    def say(s):
        print(s, flush=True)
        log.write(s + "\n")
        log.flush()

    cmd = "python bench/gpu_time.py " + " ".join(sys.argv[1:])
    dev = "cpu" if args.smoke else "cuda"
    # each shape built in its own process, all at once; a shape's workers start as soon as it is built
    # (they only load while others build: nothing is measured until every worker is ready)
    builds = {shape: subprocess.Popen([sys.executable, __file__, "--build",
                                       json.dumps({"shapes": [shape], "root": root, "dev": dev})],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for shape in runs}
    procs = []
    for shape, (seqs, cap) in runs.items():
        out, err = builds[shape].communicate()
        say(out.strip() + (f" (at {time.time() - t_start:.0f} s)"))
        if builds[shape].returncode:
            say(f"!! building {shape} failed:\n{err[-2000:]}")
            continue
        for eng in engines:
            if not seqs and eng != "snugtune":
                continue  # a memory-only shape: snugtune's rows alone
            spec = dict(engine=eng, shape=shape, root=root, seqs=seqs, cap=cap, wait=True,
                        deadline=t_start + args.deadline_s,
                        extra=args.extra == "all" or (args.extra == "first" and shape == next(iter(runs))),
                        kernels_off=not args.no_kernels_off,
                        warmup=args.warmup, steps=args.steps, prof_steps=args.prof_steps)
            if mem and mem[0] == shape:
                spec.update(mem_seq=mem[1], mem_cap=mem[2])
            env = dict(os.environ)
            if eng == "snugtune":
                env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # as snugtune's launcher sets it
            if eng == "unsloth":
                env["PYTHONPATH"] = args.unsloth_site + os.pathsep + env.get("PYTHONPATH", "")
            env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            env.setdefault("TQDM_DISABLE", "1")
            pr = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, bufsize=1)
            procs.append((eng, shape, _Lines(pr)))
    results: list[dict] = []
    ready = []
    for eng, shape, pr in procs:  # loading runs in parallel; wait for each to say ready
        tail = []
        ok = False
        for line in pr:
            if line.startswith("@@ready"):
                ok = True
                break
            if line.startswith("@@ "):
                r = json.loads(line[3:])
                results.append(r)
                say(json.dumps(r)[:400])
            else:
                tail.append(line.rstrip())
        if ok:
            ready.append((eng, shape, pr))
        else:
            results.append(dict(part="error", engine=eng, shape=shape, error="worker died while loading",
                                tail="\n".join(tail[-25:])))
            say(f"!! {eng} {shape} died while loading:\n" + "\n".join(tail[-25:]))
    say(f"all loaded at {time.time() - t_start:.0f} s")
    for eng, shape, pr in ready:  # one at a time: nothing else on the GPU while one is profiled
        t0 = time.time()
        pr.go()
        tail = []
        for line in pr:
            if line.startswith("@@done"):
                break
            if line.startswith("@@ "):
                r = json.loads(line[3:])
                results.append(r)
                say(json.dumps({k: v for k, v in r.items() if k not in ("top_kernels", "tb")})[:700])
            else:
                tail.append(line.rstrip())
        rc = pr.p.wait()
        if rc:
            results.append(dict(part="error", engine=eng, shape=shape, error=f"rc {rc}",
                                tail="\n".join(tail[-25:])))
            say(f"!! {eng} {shape} rc {rc}:\n" + "\n".join(tail[-25:]))
        say(f"-- {eng} {shape} measured in {time.time() - t0:.0f} s")

    meta = {"command": cmd, "wall_s": round(time.time() - t_start, 1), "smoke": args.smoke}
    try:
        import peft
        import torch
        import transformers

        meta.update(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                    gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                    cpus=os.cpu_count())
    except Exception as e:  # noqa: BLE001 - the table still gets written
        meta["env_error"] = repr(e)
    flops = {s: {q: flops_per_token(shape_cfg(s), q) for q in runs[s][0]} for s in runs}
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
        json.dump({"meta": meta, "flops": flops, "results": results}, f, indent=1)
    md = render(meta, flops, results, runs)
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
        f.write(md)
    say(md)
    log.close()
    return 0


def _label(r):
    return r["engine"] + (f" ({r['variant']})" if r.get("variant") else "")


def render(meta, flops, results, runs) -> str:
    L = [f"Command: `{meta['command']}` — {meta.get('gpu')}, {meta.get('cpus')} CPU cores, torch {meta.get('torch')}, "
         f"transformers {meta.get('transformers')}, peft {meta.get('peft')}; wall {meta['wall_s']} s.", ""]
    if meta.get("smoke"):
        L += ["SMOKE RUN on the CPU: times are CPU op times standing in for kernels; no numbers to keep.", ""]
    res = [r for r in results if r.get("part") == "result"]
    for shape, (seqs, cap) in runs.items():
        for seq in seqs:
            rows = [r for r in res if r["shape"] == shape and r["seq"] == seq]
            if not rows:
                continue
            fl = flops[shape][seq]
            base = next((r for r in rows if r["engine"] == "plain"), None)
            uns = next((r for r in rows if r["engine"] == "unsloth"), None)
            L += [f"### {shape}, {seq:,} tokens, batch 1 (snugtune under a {cap} GiB allocator cap)" if cap else
                  f"### {shape}, {seq:,} tokens", "",
                  f"FLOPs per token: convention 6N + 6·L·Hq·D·T = {fl['conv_6N'] / 1e9:.2f} GFLOP; QLoRA's need "
                  f"4N + 6·N_lora + 6·L·Hq·D·T = {fl['qlora_4N'] / 1e9:.2f} GFLOP (N = {fl['N'] / 1e9:.3f} B "
                  f"matmul weights incl. the head, N_lora = {fl['N_lora'] / 1e6:.1f} M).", "",
                  "| engine | GPU ms / 1k tokens | GPU time / plain's | GPU time / Unsloth's | tokens/s (wall) | "
                  "tokens/s / plain's | tokens/s / Unsloth's | kernels/step | MFU on GPU time (6N, spec 989) | "
                  "MFU wall (6N) | peak allocated / reserved GiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]

            def ratio(a, b):
                return f"{a / b:.2f}" if a and b else ""

            for r in rows:
                gms = r["gpu_ms_per_1k_tokens"]
                mfu_gpu = fl["conv_6N"] * 1000 / (gms / 1000) / 1e12 / PEAK_SPEC_TFLOPS if gms else 0
                mfu_wall = fl["conv_6N"] * r["tok_s"] / 1e12 / PEAK_SPEC_TFLOPS
                bg = base["gpu_ms_per_1k_tokens"] if base else None
                ug = uns["gpu_ms_per_1k_tokens"] if uns else None
                # wall-clock ratios as speed-ups (higher is faster); GPU-time ratios as time (lower is less work)
                L.append(f"| {_label(r)} | {gms:,.2f} | {ratio(gms, bg)} | {ratio(gms, ug)} | {r['tok_s']:,.0f} | "
                         f"{ratio(r['tok_s'], base['tok_s'] if base else None)} | "
                         f"{ratio(r['tok_s'], uns['tok_s'] if uns else None)} | {r['kernels_per_step']:,} | "
                         f"{mfu_gpu:.1%} | {mfu_wall:.1%} | {r.get('peak_allocated_gib')} / {r.get('peak_reserved_gib')} |")
            L += ["", "GPU ms per 1k tokens by kind / by phase:", "",
                  "| engine | " + " | ".join(KINDS) + " | forward | backward | recompute | graph replay | optimizer |",
                  "|---|" + "---|" * (len(KINDS) + 5)]
            for r in rows:
                k, p = r["by_kind_ms_per_1k"], r["by_phase_ms_per_1k"]
                L.append(f"| {_label(r)} | " + " | ".join(f"{k.get(x, 0):.2f}" for x in KINDS) + " | " +
                         " | ".join(f"{p.get(x, 0):.2f}" for x in ("forward", "backward", "recompute", "graph replay",
                                                                    "optimizer")) + " |")
            L += ["", "Largest kernels (GPU ms per 1k tokens, launches per step, kind):", ""]
            for r in rows:
                top = "; ".join(f"{t[0][:48]} {t[1]:.2f} ({t[2]}, {t[3]})" for t in (r.get("top_kernels") or [])[:6])
                L.append(f"- {_label(r)}: {top}")
            L.append("")
    mem = [r for r in res if str(r.get("variant", "")).startswith("memory")]
    if mem:
        L += ["### Peak memory with and without the kernels", "",
              "| shape | tokens | allocator cap GiB | variant | peak allocated GiB | peak reserved GiB | checkpointing "
              "| MLP | kernels | loss | s / step |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in mem:
            ap = r.get("applied") or {}
            L.append(f"| {r['shape']} | {r['seq']:,} | {r.get('cap_gib')} | {r['variant']} | {r.get('peak_allocated_gib')} | "
                     f"{r.get('peak_reserved_gib')} | {ap.get('checkpointing', '')} | {ap.get('mlp_tiling', '')} | "
                     f"{ap.get('kernels', '')} | {r['loss']:.4f} | {r['s_per_step']} |")
        L.append("")
    errs = [r for r in results if r.get("part") == "error"]
    if errs:
        L += ["### Failures", ""] + [f"- {json.dumps({k: v for k, v in r.items() if k != 'tb'})[:600]}" for r in errs]
        L.append("")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
