"""One benchmark process: one system (plain recipe or snugtune) on one model shape.

Loads the model once and runs one part in it; prints one JSON line per result, prefixed
with '@@ ' so bench/run.py can pick them out of library chatter. Run by bench/run.py:
  python bench/trial.py '{"part": "maxctx", "system": "snugtune", "shape": "qwen2.5-1.5b", ...}'
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from plain_recipe import SHAPES, TARGETS, build, load_plain, quant_config  # noqa: E402

GiB = 2**30


def emit(**kw):
    print("@@ " + json.dumps(kw), flush=True)


def mem():
    if not torch.cuda.is_available():
        return {}
    return {"alloc_gib": round(torch.cuda.memory_allocated() / GiB, 3),
            "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / GiB, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GiB, 3)}


def plan_for(path, seq, budget, offload="auto", compile_=False, device="cuda"):
    """The core.plan.Plan the savers execute for this bench model at `seq` tokens.

    `budget` is the allocator cap these trials set themselves (set_per_process_memory_fraction
    below), so the plan's target has no CUDA context of its own (budget = cap). The bench's
    SNUGTUNE_KEEP_LAYERS override (bench/run.py: "measure the need") forces the kept blocks."""
    from core import plan as P
    from core.catalog import spec_from_dir
    from core.config import RunConfig
    from core.gpu import GpuTarget, cpu_target

    cfg = RunConfig.from_dict({
        "model": {"name_or_path": str(path)}, "data": {"path": "(bench)", "max_seq_len": seq},
        "train": {"chunked_loss": True, "gradient_checkpointing": True, "offload_activations": offload,
                  "micro_batch": 1, "compile": compile_},
    })
    if device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory / GiB
        target = GpuTarget(name="bench", label="bench", budget_gib=budget or total, bf16=True,
                           compute_capability=(8, 0), fp16_tflops=300.0, bandwidth_gbs=3000.0,
                           total_gib=total, cuda_context_gib=0.0, budget_source="vram")
    else:
        target = cpu_target()
    keep = os.environ.get("SNUGTUNE_KEEP_LAYERS")
    return P.plan(cfg, spec_from_dir(path), target, keep=int(keep) if keep is not None else None)


def load_ours(path, device, seq, budget, offload="auto", compile_=False, seed=1234):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from core import savers

    m = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant_config(), dtype=torch.bfloat16,
                                             device_map={"": 0 if device == "cuda" else "cpu"})
    savers.prepare_for_kbit_training(m, True)
    torch.manual_seed(seed)
    m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                     target_modules=TARGETS))
    m._snug_bench_path = path
    info = savers.install_savers(m, plan_for(path, seq, budget, offload, compile_, device))
    m.train()
    return m, info


def reinstall(m, seq, budget, offload, compile_=False):
    from core import savers

    savers.uninstall_savers(m)
    return savers.install_savers(m, plan_for(m._snug_bench_path, seq, budget, offload, compile_))


def make_opt(m, lr):
    params = [p for p in m.parameters() if p.requires_grad]
    if torch.cuda.is_available():
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr)


GRAPHS = None  # core.graphs.CudaGraphStep for the snugtune-graphs variant


def train_step(m, opt, batch, ours, dev):
    loss = GRAPHS.step(batch) if (ours and GRAPHS is not None) else None
    if loss is None:
        ctx = torch.autocast(dev, dtype=torch.bfloat16) if ours else contextlib.nullcontext()
        with ctx:
            out = m(**batch)
        out.loss.backward()
        loss = out.loss.detach()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cleanup():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def markov_batches(vocab, steps, seq, seed=7):
    """Token streams from a fixed random Markov chain over 2,000 tokens (4 likely successors each):
    structure the adapters can learn, identical in every process."""
    g = torch.Generator().manual_seed(seed)
    n = min(2000, vocab)
    states = torch.randperm(vocab, generator=g)[:n]
    succ = torch.randint(0, n, (n, 4), generator=g)
    out = []
    for _ in range(steps):
        idx = torch.empty(seq, dtype=torch.long)
        cur = int(torch.randint(0, n, (1,), generator=g))
        choice = torch.randint(0, 4, (seq,), generator=g)
        for t in range(seq):
            idx[t] = cur
            cur = int(succ[cur, choice[t]])
        out.append(states[idx][None])
    return out


def mixed_lengths(n, seed=11, cap=2048):
    """Instruction-style lengths: log-normal (median ~180 tokens, most under 400, a tail to 2,048)."""
    r = random.Random(seed)
    return [int(min(cap, max(24, r.lognormvariate(5.2, 0.85)))) for _ in range(n)]


# ---------------------------------------------------------------------------------------

def part_maxctx(a, path, dev):
    """Longest length that trains 3 steps under the cap; search up from the target, or down."""
    budget = a["cap_gib"]
    t_end = time.time() + a.get("time_s", 120)
    target, step, hi = a["target"], a["step"], a.get("max_len", 1 << 20)
    seq0 = target
    m, info = load_ours(path, dev, seq0, budget, a.get("offload", "auto"))
    opt = make_opt(m, 1e-4)
    base = mem()
    vocab = m.config.vocab_size
    tried = {}

    def trial(seq):
        info = reinstall(m, seq, budget, a.get("offload", "auto"))
        cleanup()
        t0 = time.time()
        try:
            # 2 steps: the paged 8-bit optimizer's states live outside PyTorch's allocator, so the
            # second step already shows the steady-state peak (the reference ran 3)
            losses = []
            for _ in range(a.get("steps", 2)):
                ids = torch.randint(0, vocab, (1, seq), device=dev)
                losses.append(float(train_step(m, opt, {"input_ids": ids, "labels": ids}, True, dev)))
            sync()
            # a length only counts if it trains: a NaN loss (step 2 sees step 1's update) is a failure
            finite = all(math.isfinite(x) for x in losses)
            r = dict(ok=finite, seq=seq, s_per_step=round((time.time() - t0) / a.get("steps", 2), 3), **mem(),
                     losses=[round(x, 4) for x in losses], applied=info)
            if not finite:
                r["error"] = "non-finite loss"
        except torch.OutOfMemoryError as e:
            opt.zero_grad(set_to_none=True)
            r = dict(ok=False, seq=seq, **mem(), error=str(e).split("\n")[0][:200], applied=info)
        tried[seq] = r
        emit(part="maxctx", system="snugtune", shape=a["shape"], **r)
        return r["ok"]

    seq = min(target, hi)
    ups = a.get("up_trials", 1)
    if trial(seq):
        while seq < hi and time.time() < t_end and ups > 0:
            ups -= 1
            nxt = min(hi, seq + step)
            if not trial(nxt):
                break
            seq = nxt
    else:
        while seq > step and time.time() < t_end:
            seq -= step
            if trial(seq):
                break
    oks = [s for s, r in tried.items() if r["ok"]]
    best = max(oks) if oks else 0
    fails = [s for s, r in tried.items() if not r["ok"] and s > best]
    emit(part="maxctx_result", system="snugtune", shape=a["shape"], max_seq=best,
         first_fail=min(fails) if fails else None, searched_to=hi if best >= hi else None,
         at_max=tried.get(best), loaded=base)


def part_plain_maxctx(a, path, dev):
    """The reference's trial (fresh load each time) at given lengths: verifies BASELINE's limit."""
    for seq in a["lengths"]:
        m = opt = None
        cleanup()
        try:
            m = load_plain(path, dev)
            opt = make_opt(m, 1e-4)
            for _ in range(3):
                ids = torch.randint(0, m.config.vocab_size, (1, seq), device=dev)
                train_step(m, opt, {"input_ids": ids, "labels": ids}, False, dev)
            sync()
            r = dict(ok=True, seq=seq, **mem())
        except torch.OutOfMemoryError as e:
            r = dict(ok=False, seq=seq, **mem(), error=str(e).split("\n")[0][:200])
        emit(part="maxctx", system="plain", shape=a["shape"], **r)
        del m, opt
        cleanup()


def part_train(a, path, dev):
    """(c) 20-step loss on Markov data, then (b) tokens/s at a fixed length, then the mixed set."""
    ours = a["system"] != "plain"
    seq = a.get("seq", 1024)
    if ours:
        m, info = load_ours(path, dev, seq, a.get("cap_gib"), a.get("offload", "auto"),
                            compile_=a.get("compile", False))
    else:
        torch.manual_seed(1234)  # same seed right before the adapters are made: same initial adapters
        m, info = load_plain(path, dev), {}
    loaded = mem()
    vocab = m.config.vocab_size
    tag = dict(system=a["system"], shape=a["shape"], variant=a.get("variant", ""))
    global GRAPHS
    if ours and a.get("graphs") and dev == "cuda":
        from core.graphs import CudaGraphStep

        GRAPHS = CudaGraphStep(m, forward_ctx=lambda: torch.autocast("cuda", dtype=torch.bfloat16))
    # (c) loss
    opt = make_opt(m, a.get("lr", 1e-3))
    losses = []
    t0 = time.time()
    for b in markov_batches(vocab, a.get("loss_steps", 20), seq):
        b = b.to(dev)
        losses.append(float(train_step(m, opt, {"input_ids": b, "labels": b}, ours, dev)))
    if GRAPHS is not None:
        info = dict(info, cuda_graphs=GRAPHS.status)
    emit(part="loss", **tag, seq=seq, losses=losses, s=round(time.time() - t0, 2), applied=info, loaded=loaded)
    # (b) speed at a fixed length, random tokens
    cleanup()
    steps = a.get("steps", 8)
    g = torch.Generator(device=dev).manual_seed(0)
    for i in range(steps + 2):
        if i == 2:
            sync()
            t0 = time.perf_counter()
        ids = torch.randint(0, vocab, (1, seq), device=dev, generator=g)
        train_step(m, opt, {"input_ids": ids, "labels": ids}, ours, dev)
    sync()
    dt = time.perf_counter() - t0
    emit(part="speed", **tag, seq=seq, tok_s=round(steps * seq / dt, 1), s_per_step=round(dt / steps, 4), **mem(),
         cuda_graphs=GRAPHS.status if GRAPHS is not None else None)
    if a.get("profile") and os.environ.get("OUT") and dev == "cuda":
        try:
            _profile(a, m, opt, vocab, seq, ours, dev, g, tag)
        except Exception as e:  # a profiler problem must not cost the other results
            emit(part="profile", **tag, error=repr(e)[:200])
    if not a.get("mixed", True):
        return
    if ours:
        for pl in a.get("pack_lens", [4096, 16384]):
            _mixed(dict(a, pack_len=pl), m, opt, vocab, ours, dev, tag)
    else:
        _mixed(a, m, opt, vocab, ours, dev, tag)


def _profile(a, m, opt, vocab, seq, ours, dev, g, tag):
    if True:
        # where a step's time goes: two steps under the profiler, top ops by CPU and by GPU time
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                ids = torch.randint(0, vocab, (1, seq), device=dev, generator=g)
                train_step(m, opt, {"input_ids": ids, "labels": ids}, ours, dev)
            sync()
        ka = prof.key_averages()
        with open(os.path.join(os.environ["OUT"], f"profile_{a.get('variant') or a['system']}.txt"), "w") as f:
            f.write(ka.table(sort_by="self_cpu_time_total", row_limit=35))
            f.write(ka.table(sort_by="self_device_time_total", row_limit=25))
        try:
            n_kernels = sum(e.count for e in ka if getattr(getattr(e, "device_type", None), "name", "") == "CUDA")
            emit(part="profile", **tag, cuda_events_per_step=n_kernels // 2)
        except Exception as e:  # the profile file is the point; the count is a convenience
            emit(part="profile", **tag, error=repr(e)[:200])


def _mixed(a, m, opt, vocab, ours, dev, tag):
    # (b') mixed-length instruction-style set: ours packs, plain pads a batch of 4
    global GRAPHS
    if GRAPHS is not None:  # as a new engine run with this row length would: its own graph
        from core.graphs import CudaGraphStep

        GRAPHS.release("next part")
        GRAPHS = CudaGraphStep(m, forward_ctx=lambda: torch.autocast("cuda", dtype=torch.bfloat16))
    cleanup()
    lengths = mixed_lengths(a.get("mixed_n", 128))
    rg = torch.Generator().manual_seed(3)
    samples = [torch.randint(0, vocab, (n,), generator=rg) for n in lengths]
    batches = []
    if ours:
        row_len = a.get("pack_len", 4096)
        rows, cur = [], []
        for s in samples:  # greedy in order: a row closes when the next sample would overflow it
            if cur and sum(len(x) for x in cur) + len(s) > row_len:
                rows.append(cur)
                cur = []
            cur.append(s)
        rows.append(cur)
        for row in rows:
            padn = row_len - sum(len(x) for x in row) if GRAPHS is not None else 0
            if padn > 0:
                # as the engine does with graphs on: rows padded to the full length (one shape),
                # the padding a sample of its own whose labels are ignored
                row = row + [torch.zeros(padn, dtype=torch.long)]
            ids = torch.cat(row)[None]
            lab = ids.clone()
            pos = torch.cat([torch.arange(len(x)) for x in row])[None]
            starts = torch.tensor([0] + [len(x) for x in row[:-1]]).cumsum(0)
            lab[0, starts] = -100  # no sample's first token is predicted from the previous sample
            if padn > 0:
                lab[0, -padn:] = -100
            batches.append({"input_ids": ids, "labels": lab, "position_ids": pos})
    else:
        bs = a.get("pad_batch", 4)
        for i in range(0, len(samples), bs):
            grp = samples[i:i + bs]
            T = max(len(x) for x in grp)
            ids = torch.zeros((len(grp), T), dtype=torch.long)
            am = torch.zeros((len(grp), T), dtype=torch.long)
            for j, x in enumerate(grp):
                ids[j, :len(x)] = x
                am[j, :len(x)] = 1
            lab = ids.masked_fill(am == 0, -100)
            batches.append({"input_ids": ids, "attention_mask": am, "labels": lab})
    useful = sum(lengths)
    padded = sum(b["input_ids"].numel() for b in batches)
    for b in batches[:2]:  # warm-up on the first two batches (also timed below)
        train_step(m, opt, {k: v.to(dev) for k, v in b.items()}, ours, dev)
    sync()
    t0 = time.perf_counter()
    for b in batches:
        train_step(m, opt, {k: v.to(dev) for k, v in b.items()}, ours, dev)
    sync()
    dt = time.perf_counter() - t0
    emit(part="mixed", **tag, pack_len=a.get("pack_len", 4096) if ours else None, samples=len(samples), useful_tokens=useful, processed_tokens=padded,
         steps=len(batches), useful_tok_s=round(useful / dt, 1), s=round(dt, 2), **mem(),
         cuda_graphs=GRAPHS.status if GRAPHS is not None else None)


def main():
    a = json.loads(sys.argv[1])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    root = a["root"]
    if dev == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0)  # building needs the whole model
    path = build(a["shape"], root, dev)
    if dev == "cuda" and a.get("cap_gib"):
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(a["cap_gib"] * GiB / total)
    cleanup()
    {"maxctx": part_maxctx, "plain_maxctx": part_plain_maxctx, "train": part_train}[a["part"]](a, path, dev)


if __name__ == "__main__":
    main()
