"""CUDA-graph training steps: one replay instead of thousands of kernel launches.

A 0.5B-3B model on a large GPU is bound by the CPU, not the GPU: a QLoRA step of
Qwen2.5-1.5B at 1,024 tokens launches ~9,000 kernels, each with Python, autograd and
dispatcher work around it, while the GPU itself is busy for a fifth of the step. A CUDA
graph records the forward and backward of one micro-batch once and replays them with a
single launch, so the step costs what the GPU needs.

What a replay needs is the same shapes and no host synchronisation. The savers have a
static mode for that (core.savers.static_mode): the loss keeps every token and
weighs the ignored ones 0 (no selection of the valid rows), the divisor is a device
tensor, and packed or padded rows attend through a causal, same-sample mask built on the
device. Static mode runs for every micro-batch this class handles, captured or not, so
the warm-up steps and the replays compute the same thing.

Used only where it is safe: CUDA, bf16 (fp16's loss scaler lives outside), no dropout
(no RNG inside the graph), the savers' chunked loss, short rows (the T x T mask; long rows
are bound by the GPU anyway), no activation offload (side streams), inputs that are only
input_ids / labels / position_ids / attention_mask. Each shape is first run twice
eagerly (lazy initialisation, cuBLAS workspaces), then captured, at most `max_graphs`
shapes per run (each graph keeps its own memory pool); other shapes run eagerly. A
capture that fails turns graphs off for the run and says why (`status`); so does an eager
step that runs out of memory beside a graph's pool (the Trainer then frees the graph and
retries that step; see core.train).

Gradients: the graph's backward writes into its own gradient buffers; after a replay they
are added to the parameters' .grad (or become it, when .grad is empty and the step is
the last of its accumulation window), so gradient accumulation and the optimizer see
exactly what eager steps give them.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch

from core import savers

# Static mode builds a B x T x T boolean mask per micro-batch: short rows only (the plan's limit).
from core.plan import GRAPH_MAX_TOKENS  # noqa: E402
# Eager runs of a shape before it is captured.
WARMUP_STEPS = 2
_ALLOWED_KEYS = {"input_ids", "labels", "position_ids", "attention_mask"}


def model_support(model) -> tuple[bool, str]:
    """Whether the model object (peft-wrapped, savers installed) can run graphed steps, and why not.

    Whether graphed steps run at all is the plan's decision (core.plan: CUDA, bf16, no LoRA
    dropout, no compile, short rows, no offload); this checks what only the loaded model can
    show: it is on a CUDA device, the savers' loss really was patched in (a head with a bias
    keeps its own), and the model itself has no dropout."""
    hf = savers._unwrap(model)
    try:
        p = next(hf.parameters())
    except StopIteration:
        return False, "the model has no parameters"
    if p.device.type != "cuda":
        return False, "not on a CUDA device"
    if not hasattr(hf.forward, "_snug_orig"):
        return False, "the chunked loss is off or not available for this model"
    state = getattr(hf, "_snug_ckpt_state", None)
    if state is not None and state.get("keep_rng"):
        return False, "the model has dropout (random numbers inside a graph)"
    return True, ""


class CudaGraphStep:
    """Forward + backward of one micro-batch, replayed from a CUDA graph per input shape.

    `step(inputs, num_items_in_batch, accumulation_steps, last_in_window)` returns the
    loss (detached, like the Trainer's training_step) with the gradients accumulated, or
    None when it did not handle the batch (the caller runs its eager step).
    """

    def __init__(self, model=None, *, max_tokens: int = GRAPH_MAX_TOKENS, max_graphs: int = 1,
                 warmup: int = WARMUP_STEPS, forward_ctx: Optional[Callable[[], Any]] = None):
        self.model = None
        self.max_tokens = max_tokens
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.forward_ctx = forward_ctx or contextlib.nullcontext
        self.disabled: Optional[str] = None
        self.seen: dict[tuple, int] = {}
        self.graphs: dict[tuple, dict] = {}
        self.replays = 0
        self.pool = None
        self.skipped: Optional[str] = None  # why the last batch was not taken
        if model is not None:
            self.bind(model)

    def bind(self, model) -> None:
        """Attach to the model that training steps call (the Trainer's accelerate-wrapped one)."""
        self.model = model
        ok, why = model_support(model)
        self.disabled = None if ok else why
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.hf = savers._unwrap(model)
        if self.disabled is None:
            dev = self.params[0].device
            self.div_given = torch.zeros((), dtype=torch.float32, device=dev)
            self.div_per_token = torch.zeros((), dtype=torch.float32, device=dev)

    # ---- what the event log shows -------------------------------------------------------

    @property
    def status(self) -> str:
        if self.model is None:
            return "on: no step yet"
        if self.disabled:
            return f"off: {self.disabled}"
        if self.graphs:
            shapes = ", ".join(f"{k[0][0]} x {k[0][1]}" for k in self.graphs)
            return f"on: {len(self.graphs)} graph(s) ({shapes} tokens), {self.replays} replays"
        if self.skipped and not self.seen:
            return f"on, not used: {self.skipped}"
        return "on: waiting for a repeated batch shape"

    # ---- eligibility ---------------------------------------------------------------------

    def _key(self, inputs: dict) -> Optional[tuple]:
        if set(inputs) - _ALLOWED_KEYS or "input_ids" not in inputs or "labels" not in inputs:
            self.skipped = "the batch carries more than input ids, labels, positions and mask"
            return None
        ids = inputs["input_ids"]
        if ids.dim() != 2 or ids.numel() > self.max_tokens or not ids.is_cuda:
            self.skipped = f"micro-batches over {self.max_tokens:,} tokens run eagerly (bound by the GPU anyway)"
            return None
        state = getattr(self.hf, "_snug_ckpt_state", None)
        if state is not None and state["offload_now"](torch.empty((ids.numel(), 1), device="meta")):
            self.skipped = "activations are offloaded to CPU memory at this length"
            return None
        spec = tuple((k, tuple(inputs[k].shape), inputs[k].dtype) for k in sorted(inputs))
        return (tuple(ids.shape), spec)

    # ---- the step ------------------------------------------------------------------------

    def _set_divisor(self, num_items_in_batch, accumulation_steps: int) -> None:
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                self.div_given.copy_(num_items_in_batch.reshape(()).to(self.div_given.device, non_blocking=True))
            else:
                self.div_given.fill_(float(num_items_in_batch))
            self.div_per_token.fill_(0.0)
        else:  # the Trainer's mean over this micro-batch's tokens, divided by the accumulation steps
            self.div_given.fill_(0.0)
            self.div_per_token.fill_(float(accumulation_steps))

    def _forward_backward(self, inputs: dict) -> torch.Tensor:
        with savers.static_mode(self.div_given, self.div_per_token):
            with self.forward_ctx():
                loss = self.model(**inputs).loss
            loss.backward()
        return loss

    def step(self, inputs: dict, num_items_in_batch=None, accumulation_steps: int = 1,
             last_in_window: bool = True) -> Optional[torch.Tensor]:
        if self.disabled is not None:
            return None
        key = self._key(inputs)
        if key is None:
            return None
        if key not in self.graphs and len(self.graphs) >= self.max_graphs:
            return None
        self._set_divisor(num_items_in_batch, accumulation_steps)
        g = self.graphs.get(key)
        if g is None:
            n = self.seen.get(key, 0)
            self.seen[key] = n + 1
            if n < self.warmup:
                return self._forward_backward(inputs).detach()
            g = self._capture(key, inputs)
            if g is None:  # capture failed: this step runs eagerly, graphs are off from now on
                return self._forward_backward(inputs).detach()
        for k, t in inputs.items():
            g["inputs"][k].copy_(t, non_blocking=True)
        g["graph"].replay()
        self.replays += 1
        self._accumulate(g["grads"], last_in_window)
        return g["loss"].detach().clone()

    def release(self, why: str) -> None:
        """Free every graph and its memory pool and run eagerly from now on (e.g. an eager step of
        another shape ran out of memory beside the graph's pool)."""
        had = bool(self.graphs)
        self.graphs.clear()
        self.seen.clear()
        self.pool = None
        self.disabled = why
        if had and torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def _accumulate(self, grads: list, last_in_window: bool) -> None:
        into, add = [], []
        for p, sg in zip(self.params, grads):
            if sg is None:
                continue
            if p.grad is None or p.grad is sg:
                # empty (None, or the buffer lent last step and zeroed since): this replay's
                # gradient is the whole gradient. The graph's buffer is overwritten by the next
                # replay, so it is lent only when the optimizer consumes it before then (the
                # last micro-batch of the accumulation window); otherwise it is copied.
                p.grad = sg if last_in_window else sg.clone()
            else:
                into.append(p.grad)
                add.append(sg)
        if into:
            torch._foreach_add_(into, add)

    def _capture(self, key: tuple, inputs: dict) -> Optional[dict]:
        saved = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        static_inputs = {k: t.clone() for k, t in inputs.items()}
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the warm-up's cached blocks would sit beside the graph's pool
        graph = torch.cuda.CUDAGraph()
        try:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="global"):
                loss = self._forward_backward(static_inputs)
        except Exception as exc:  # noqa: BLE001 - any failure means: run eagerly, say why
            for p, s in zip(self.params, saved):
                p.grad = s
            self.disabled = f"capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
            del graph
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            return None
        grads = [p.grad for p in self.params]
        for p, s in zip(self.params, saved):
            p.grad = s
        g = {"graph": graph, "inputs": static_inputs, "loss": loss, "grads": grads}
        self.graphs[key] = g
        return g
