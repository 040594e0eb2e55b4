"""The fp16 guard: train models whose activations overflow fp16 on cards without bf16.

What overflows (measured, bench/fp16_overflow.py, bench/results/fp16_overflow_gemma3_270m.json):
on the real Gemma 3 270M weights (48 tokens of mixed English and code, CPU, fp32 reference run)
every operation *inside* a decoder block stays far below fp16's largest value (65,504): q/k/v
under 60, the MLP's gate/up/down under 15, the post-norms' outputs under 20,000. What
overflows is the residual stream itself: the sum the blocks add into reaches 68,000 at block 7
and 104,000 at block 14 of 18, so in fp16 it turns into inf at block 7 and the final norm and
the logits are NaN from the first step. Gemma 2 has the same layout (a sqrt(hidden)-scaled
embedding, four norms a block with post-norms feeding a residual that is never normalised) and
the same published fp16 failure (Unsloth's Gemma 2/3 notes; transformers' Gemma 2 docs advise
against fp16); its 2B weights are not available here, so that entry is by architecture, not
measured. Llama, Qwen2/3, SmolLM, Phi-3, StableLM: no overflow reported and none seen in the
demo model; they train in plain fp16 (the guard can be forced on with model.fp16_guard = "on").

What the guard does (per model instance, undone by core.savers.uninstall_savers: every patched
forward carries `_snug_orig`): the residual stream is fp32, everything else keeps its dtype.
* the token embedding's output is cast to fp32 (its values are small; the sum is what grows);
* the norms that feed the residual (Gemma's post_attention/post_feedforward norms) take fp32
  and return fp32, so each block's additions happen in fp32 (fp16 + fp32 promotes to fp32);
* the norms that read the residual (input_layernorm, pre_feedforward_layernorm, Llama's
  post_attention_layernorm, the final norm) compute in fp32 and return the compute dtype: their
  output is normalised (|x| < 100 measured) and feeds the fp16 matmuls, which stay fp16.
* with core/kernels.py installed (CUDA, the plan's `kernels`), those norms and the q/k norms are its
  fused RMSNorm with these dtypes (fp32 in / fp16 out, fp16 in / fp32 out), not transformers' module on
  an fp32 upcast: the same fp32 arithmetic, and what they keep for the backward is the input as given
  (a post-norm's 16-bit input where the PyTorch path kept its fp32 copy) and 1/rms. Before session 7
  the guard kept its own norms: fp16 + guard held 1.31 GiB against bf16's 1.18 on Gemma 3 270M
  (real_weights run 5), where the fp32 stream alone accounts for ~0.02 GiB.
Attention and the MLP run in fp16 as before; dynamic loss scaling (the Trainer's GradScaler)
stays: a step whose fp16 gradients overflow is skipped and the scale halves. Only its first
scale is lower (set_initial_loss_scale: 2^12, not 2^16, which skipped the first two steps).

Cost (model it in the estimator): the residual stream is 4 bytes an element instead of 2, so
each checkpointed block input costs 2 more bytes: + L x T x H x 2 bytes kept (T tokens in the
micro-batch, H hidden, L blocks; on the host instead when inputs are offloaded), plus ~4 live
fp32 copies of the stream in the block being run: + 4 x T x H x 4 bytes transient.
extra_bytes() returns that. Speed: the norms already computed in fp32 internally; the extra
casts are element-wise. Measured on one H200 with Gemma 3 270M (real_weights run 4, each run
alone, bench/results/real_weights_run4_speed.json): fp16 + guard 2,112 tokens/s against bf16's
2,094 (the loss scaler's checks included; neither graphed), the same peaks (1.37 GiB allocated,
1.47 reserved); 200 steps all finite, the loss curve 0.7% from bf16's (run 4). With the kernels and the
guard's norms fused (bench/results/fp16guard_speed_run1.md: H200, random-init Gemma-3-270M shape, each run
alone): peak allocated 1.070 GiB against bf16's 1.026 (+4.3%; its own norms: 1.155, +12.6%), CUDA kernel
time 26.9 against 26.6 ms per 1k tokens (+1.3%; its own norms: 30.6, +15.4%).

Importing this module does not import torch (core.plan calls needs_fp16_guard in the wizard).
"""
from __future__ import annotations

import math
import types
from typing import Any, Optional, Union

# Families whose residual stream overflows fp16, and why we know.
GUARDED = {
    "gemma3_text": "Gemma 3's residual stream reaches 104,000 (measured on Gemma 3 270M), above fp16's 65,504",
    "gemma3": "Gemma 3's residual stream reaches 104,000 (measured on Gemma 3 270M), above fp16's 65,504",
    "gemma2": "Gemma 2 has Gemma 3's residual layout and its published fp16 overflow (not measured here)",
    "gemma": "Gemma's sqrt(hidden)-scaled embedding grows the residual stream like Gemma 2/3's (not measured here)",
}
FP16_MAX = 65504.0
# After this many optimizer steps in a row skipped by the loss scaler (finite loss, inf/NaN
# gradients), the scale has dropped by 2^N: past 2^-20 of its start nothing normal is left.
SKIPPED_LIMIT = 20


def _model_type(x: Any) -> str:
    if isinstance(x, str):
        return x
    for attr in ("model_type",):
        mt = getattr(x, attr, None)
        if isinstance(mt, str):
            return mt
    cfg = getattr(x, "config", None)
    return str(getattr(cfg, "model_type", "") or "")


def needs_fp16_guard(spec_or_model_type: Union[str, Any], setting: str = "auto") -> tuple[bool, str]:
    """(on, why) for a model trained in fp16: a ModelSpec, a transformers config/model, or a
    model_type string. `setting` is model.fp16_guard: "auto" decides by family, "on"/"off" force."""
    mt = _model_type(spec_or_model_type)
    if setting == "on":
        return True, "forced on (model.fp16_guard = 'on')"
    if setting == "off":
        return False, "forced off (model.fp16_guard = 'off')" + (f"; {GUARDED[mt]}: expect NaN" if mt in GUARDED else "")
    if mt in GUARDED:
        return True, GUARDED[mt] + ": the residual stream stays fp32"
    return False, f"not needed: no fp16 overflow known for {mt or 'this model'}"




def extra_bytes(layers: int, tokens: int, hidden: int, offloaded: bool = False) -> dict:
    """What the guard adds to a step's peak (bytes): fp32 block inputs and the live fp32 stream."""
    kept = 0 if offloaded else layers * tokens * hidden * 2
    return {"kept_inputs": kept, "transient": 4 * tokens * hidden * 4, "host": layers * tokens * hidden * 2 if offloaded else 0}


def divergence_hint(compute: str, guarded: bool, model_type: str = "") -> str:
    """What to change when a run diverged, for the run_failed message."""
    if compute == "fp16" and not guarded:
        return ("the model's activations probably overflow fp16: set model.fp16_guard = 'on' (keeps the residual "
                "stream in fp32), or model.compute_dtype = 'fp32' on this card (2x memory), or train on a GPU with bf16")
    if compute == "fp16":
        return ("with the fp16 guard on, overflow left is inside a block: use model.compute_dtype = 'fp32' on this "
                "card, or a GPU with bf16 (Ampere or newer); a lower train.learning_rate helps if the loss grew first")
    return ("lower train.learning_rate (e.g. halve it), keep train.max_grad_norm at 1.0, check the data for empty "
            "or huge samples; then start a new run")


class StepHealth:
    """Counts bad steps: a non-finite loss is divergence; in fp16 a finite loss with a non-finite
    gradient norm is the loss scaler skipping a step (normal at the start, while the scale falls)."""

    def __init__(self, fp16: bool, diverged_after: int = 3, skipped_limit: int = SKIPPED_LIMIT):
        self.fp16 = fp16
        self.diverged_after = diverged_after
        self.skipped_limit = skipped_limit
        self.bad = 0
        self.skipped = 0

    def update(self, loss: Optional[float], grad_norm: Optional[float]) -> Optional[str]:
        """None while healthy; else a sentence saying what went wrong."""
        ok_loss = loss is None or (isinstance(loss, (int, float)) and math.isfinite(loss))
        ok_grad = grad_norm is None or (isinstance(grad_norm, (int, float)) and math.isfinite(grad_norm))
        if ok_loss and ok_grad:
            self.bad = self.skipped = 0
            return None
        if ok_loss and self.fp16:
            self.skipped += 1
            self.bad = 0
            if self.skipped >= self.skipped_limit:
                return (f"fp16 gradients overflowed in {self.skipped} steps in a row (each skipped by the loss "
                        "scaler, which is now 2^-%d of its start)" % self.skipped)
            return None
        self.bad += 1
        if self.bad >= self.diverged_after:
            what = "the loss" if not ok_loss else "the gradient norm"
            return f"{what} is not a number for {self.bad} steps in a row"
        return None


# ---- the patches (torch from here on) ------------------------------------------------------------

# Norms that read the residual stream (their output feeds the block's matmuls).
_READS = ("input_layernorm", "pre_feedforward_layernorm")
# Norms whose output is added to the residual stream (Gemma 2/3).
_FEEDS = ("post_attention_layernorm", "post_feedforward_layernorm")


def _unwrap(model):
    m = model
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    return m


def _patch(mod, fn) -> None:
    orig = mod.forward
    fn._snug_orig = orig
    fn._snug_fp16guard = True
    mod.forward = fn


# The guard's norms through core/kernels.py's fused RMSNorm when the kernels are installed (install's
# `kernels`). Off: its own PyTorch norms (transformers' module on an fp32 input), as before session 7;
# bench/fp16guard_speed.py turns it off to measure both in one call.
FUSED_NORMS = True


def _fused_kernels(kernels: bool):
    """core.kernels when the guard's norms can be fused (the kernels installed and none failed), else None."""
    if not (kernels and FUSED_NORMS):
        return None
    try:
        from core import kernels as K
    except Exception:  # noqa: BLE001 - no Triton: the guard's own norms
        return None
    return K if K.BROKEN is None else None


def install(model, compute_dtype, kernels: bool = False) -> dict:
    """Patch a (peft-wrapped) causal LM so its residual stream is fp32. Returns what was patched.

    Run after core.savers.install_savers (which starts by undoing every `_snug_orig` patch). `kernels`:
    install_savers put core/kernels.py's fused kernels in (it leaves the norms to the guard); the guard's
    norms then run as the fused RMSNorm too, with the fp32 stream's dtypes (see _norm below)."""
    import torch

    from core.savers import _decoder_layers

    hf = _unwrap(model)
    cdt = compute_dtype
    n_read = n_feed = n_fused = 0
    K = _fused_kernels(kernels)

    def _norm(mod, out_fp32: bool):
        """The guard's norm: fp32 compute on an fp32 input (the stream, or a 16-bit input upcast), the
        result fp32 (a norm that feeds the stream) or the compute dtype (one that reads it).

        Fused (core.kernels.rms_norm, one kernel each way): the same fp32 arithmetic up to the row sum's
        order, the result rounded once to its dtype, dx once to the input's. It keeps the input as given
        and 1/rms: a 16-bit input (Gemma's post-norms read the attention's / MLP's fp16 output) is kept in
        16 bits where the PyTorch path keeps its fp32 upcast, 2 bytes an element less, as the fused norm
        keeps in bf16; a norm that reads the stream keeps the fp32 stream itself (for the block's first
        norm that is the block input, kept anyway; the pre-MLP norm's, 4 bytes where bf16 keeps 2, is
        what the guard's fp32 stream costs there). If a kernel fails, core.kernels._guarded warns once
        and every norm takes the PyTorch path from then on."""
        nonlocal n_fused
        orig = mod.forward
        od = torch.float32 if out_fp32 else cdt

        def torch_path(x, *a, **k):
            return orig(x.float(), *a, **k).to(od)

        name = type(mod).__name__
        w0 = getattr(mod, "weight", None)
        if K is None or name not in (K.LLAMA_NORMS | K.GEMMA_NORMS) or not isinstance(w0, torch.Tensor):
            _patch(mod, torch_path)
            return
        gemma = name in K.GEMMA_NORMS
        eps = float(getattr(mod, "variance_epsilon", getattr(mod, "eps", 1e-6)))

        def forward(x, *a, **k):
            w = mod.weight
            if a or k or w.requires_grad or x.shape[-1] != w.shape[0] or not K._on_device(x, w):
                return torch_path(x, *a, **k)
            # Llama-style norms round the normalised row to the input's dtype before the weight; the
            # guard's PyTorch path hands them fp32, so the kernel gets fp32 too (Gemma's (1 + w) is fp32
            # throughout: its 16-bit input goes in as it is)
            xi = x if gemma else x.float()
            return K._guarded(lambda: K.rms_norm(xi, w, eps, gemma, out_dtype=od), lambda: torch_path(x))

        _patch(mod, forward)
        n_fused += 1

    def to32(mod):
        _norm(mod, out_fp32=True)

    def read32(mod):
        _norm(mod, out_fp32=False)

    emb = hf.get_input_embeddings() if hasattr(hf, "get_input_embeddings") else None
    if emb is None or "forward" in emb.__dict__:
        return {"fp16_guard": "not installed: no plain input embedding to patch"}
    e_orig = emb.forward

    def emb_forward(ids, *a, **k):
        return e_orig(ids, *a, **k).float()

    _patch(emb, emb_forward)
    layers = _decoder_layers(hf) or []
    for lyr in layers:
        has_pre_ff = hasattr(lyr, "pre_feedforward_layernorm")
        for name in ("input_layernorm", "pre_feedforward_layernorm", "post_attention_layernorm",
                     "post_feedforward_layernorm"):
            norm = getattr(lyr, name, None)
            if norm is None or "forward" in norm.__dict__:
                continue
            # In Llama-style blocks post_attention_layernorm is the pre-MLP norm (it reads the stream)
            feeds = name in _FEEDS and (has_pre_ff or name == "post_feedforward_layernorm")
            if feeds:
                to32(norm)
                n_feed += 1
            else:
                read32(norm)
                n_read += 1
    # RoPE's cos/sin follow the dtype of the tensor they are given (now the fp32 stream): keep them
    # in the compute dtype, as without the guard, so q and k stay 16-bit like v
    n_rope = 0
    for mod in hf.modules():
        if type(mod).__name__.endswith("RotaryEmbedding") and "forward" not in mod.__dict__:
            r_orig = mod.forward

            def rope_forward(x, *a, _orig=r_orig, **k):
                out = _orig(x, *a, **k)
                return tuple(t.to(cdt) for t in out) if isinstance(out, tuple) else out.to(cdt)

            _patch(mod, rope_forward)
            n_rope += 1
    inner = getattr(hf, "model", None)
    final = getattr(inner, "norm", None) if inner is not None else None
    if isinstance(final, torch.nn.Module) and "forward" not in final.__dict__:
        read32(final)
        n_read += 1
    what = f"residual stream fp32 ({len(layers)} blocks; {n_read} norms read it, {n_feed} feed it"
    if K is not None:
        # the norms off the stream (Gemma 3's and Qwen3's q/k norms: fp16 in, fp16 out), which
        # core.kernels.install left to the guard with the others: its ordinary fused norm
        n_qk = 0
        for mod in hf.modules():
            if (type(mod).__name__ in (K.LLAMA_NORMS | K.GEMMA_NORMS) and "forward" not in mod.__dict__
                    and isinstance(getattr(mod, "weight", None), torch.Tensor)):
                K._patch_norm(mod, type(mod).__name__ in K.GEMMA_NORMS)
                n_qk += 1
        what += f"; fused Triton norms: {n_fused} of the stream's, {n_qk} others"
    return {"fp16_guard": what + ")"}


# The loss scaler's first scale. torch's and accelerate's default, 2^16, overflowed the first two
# steps of every fp16 run on Gemma 3 270M (bench/results/real_weights_run2.json: 65,536 and 32,768
# gave inf gradients, 16,384 held; guarded and plain recipe alike): two skipped steps that leave the
# fp16 curve two steps behind bf16's where the loss falls fastest (19% above it over steps 1-20).
# 2^12 is 4x under the scale that held; the scaler still doubles it after every 2,000 clean steps
# and halves it on an overflow, so it finds its own level either way. Only the start changes.
FP16_INIT_SCALE = 2.0 ** 12


def set_initial_loss_scale(trainer, init_scale: float = FP16_INIT_SCALE) -> Optional[float]:
    """Give a Trainer's fp16 GradScaler a lower first scale (before train(): accelerate hands the
    scaler to the optimizer wrapper in prepare()). Returns the scale set, or None (no scaler: bf16, CPU)."""
    import torch

    acc = getattr(trainer, "accelerator", None)
    old = getattr(acc, "scaler", None)
    # exactly torch's scaler (a sharded one, FSDP's, keeps its own)
    if type(old) is not torch.amp.GradScaler or not old.is_enabled():
        return None
    acc.scaler = torch.amp.GradScaler(getattr(old, "_device", "cuda"), init_scale=init_scale, growth_factor=old.get_growth_factor(),
                                      backoff_factor=old.get_backoff_factor(),
                                      growth_interval=old.get_growth_interval())
    return init_scale


def installed(model) -> bool:
    hf = _unwrap(model)
    emb = hf.get_input_embeddings() if hasattr(hf, "get_input_embeddings") else None
    return emb is not None and hasattr(emb.__dict__.get("forward"), "_snug_fp16guard")
