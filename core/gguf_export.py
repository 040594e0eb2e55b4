"""Write a merged transformers model as a GGUF file for llama.cpp, Ollama and LM Studio.

Why snugtune has its own converter: llama.cpp's `convert_hf_to_gguf.py` is not installable as a
package (the `llama-cpp-python` wheel builds llama.cpp's library from its source but ships no
converter; copying the script into snugtune would vendor another project's source, and fetching
it at export time would need the network). What the converter does for the architectures
snugtune trains is small and well defined: GGUF metadata keys, tensor names, a few weight
layout changes, and the tokenizer's vocabulary. The `gguf` package (llama.cpp's own gguf-py,
pure Python, on PyPI) supplies the file writer, the key names and the HF -> GGUF tensor-name
map; this module supplies the rest. Quantizing (q8_0, q4_k_m, ...) is done by llama.cpp itself,
through `llama_model_quantize` in llama-cpp-python's binding, from a 16-bit GGUF written here.

Architectures: llama (also SmolLM and Mistral, which llama.cpp runs as llama), qwen2, qwen3,
gemma2, gemma3 (text). Tokenizers: byte-level BPE ("gpt2" in llama.cpp; the pre-tokenizer is
recognised from tokenizer.json) and SentencePiece-style BPE with byte fallback ("llama").

Nothing here imports torch at module level; `write_gguf` takes a state dict of tensors.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from core.errors import UserError

INSTALL_HINT = "pip install 'snugtune[gguf]'  (installs llama-cpp-python and gguf; pip compiles llama.cpp once, ~10 minutes on 2 cores)"

# --quant choices -> llama.cpp's file types (llama.h's LLAMA_FTYPE_MOSTLY_*; gguf.LlamaFileType).
QUANTS = {"f16": 1, "bf16": 32, "q8_0": 7, "q5_k_m": 17, "q4_k_m": 15}
DEFAULT_QUANT = "q4_k_m"
# Bits per weight of the 2-D weights, for the wizard's size estimate. q8_0: 34 bytes per 32
# weights; q4_k_m/q5_k_m: llama.cpp's mixes (some tensors kept at q6_k) land near 4.9 and 5.7 bpw
# on 0.5-8B models (llama.cpp's quantize README table; gemma-3-270m measured here: bench/results).
BITS_PER_WEIGHT = {"f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q5_k_m": 5.7, "q4_k_m": 4.9}

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3_text")


def estimate_size_bytes(n_params: int, quant: str, embed_params: int = 0) -> int:
    """Rough GGUF size: 2-D weights at the quant's bits per weight. llama.cpp keeps the token
    embedding at q8_0/q6_k in k-quant mixes, so a model dominated by its vocabulary (Gemma's
    262k tokens) gets that share at 8.5 bits."""
    bpw = BITS_PER_WEIGHT[quant]
    emb_bpw = max(bpw, 8.5) if quant.startswith("q4") or quant.startswith("q5") else bpw
    return int(((n_params - embed_params) * bpw + embed_params * emb_bpw) / 8) + 2_000_000


def require_llama_cpp():
    """The llama_cpp module, or one UserError with the install command."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise UserError("GGUF export needs llama.cpp's Python binding (llama-cpp-python), which is not installed",
                        hint=INSTALL_HINT) from None
    return llama_cpp


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF export needs the `gguf` package, which is not installed", hint=INSTALL_HINT) from None
    return gguf


# ---- the tokenizer ---------------------------------------------------------------------------------

# Byte-level BPE pre-tokenizer regexes (tokenizer.json "Split" patterns) -> llama.cpp's
# tokenizer.ggml.pre names. llama.cpp applies its own copy of each regex by that name.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_BY_REGEX = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}


def _pre_tokenizer_name(tj: dict) -> str:
    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"  # llama.cpp's name for the GPT-2 regex
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        if regex in _PRE_BY_REGEX:
            return _PRE_BY_REGEX[regex]
    raise UserError(f"this model's tokenizer splits text in a way snugtune's GGUF converter does not know "
                    f"(pre_tokenizer: {json.dumps(pre)[:200]})",
                    hint="export with --merged and convert with llama.cpp's convert_hf_to_gguf.py")


@dataclass
class Vocab:
    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)
    pre: str
    tokens: list[str]
    types: list[int]
    scores: Optional[list[float]] = None
    merges: Optional[list[str]] = None
    add_space_prefix: Optional[bool] = None
    special: dict = field(default_factory=dict)  # bos/eos/unk/pad/eot -> id
    add_bos: bool = False
    chat_template: Optional[str] = None


def read_vocab(tokenizer, vocab_size: int) -> Vocab:
    """The tokenizer's vocabulary in llama.cpp's terms (from its tokenizer.json backend)."""
    gguf = _gguf()
    TT = gguf.TokenType
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise UserError(f"the tokenizer ({type(tokenizer).__name__}) has no tokenizer.json backend, which GGUF export reads",
                        hint="export with --merged and convert with llama.cpp's convert_hf_to_gguf.py")
    tj = json.loads(backend.to_str())
    model = tj["model"]
    if model.get("type") != "BPE":
        raise UserError(f"the tokenizer's model is {model.get('type')}, not BPE; snugtune's GGUF converter reads BPE tokenizers",
                        hint="export with --merged and convert with llama.cpp's convert_hf_to_gguf.py")
    id_to_tok: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    for i, a in added.items():
        id_to_tok[i] = a["content"]
    n = max(vocab_size, max(id_to_tok) + 1)
    tokens, types = [], []
    spm = bool(model.get("byte_fallback"))
    for i in range(n):
        t = id_to_tok.get(i)
        if t is None:  # the embedding has rows the tokenizer never produces
            tokens.append(f"[PAD{i}]")
            types.append(TT.UNUSED)
        elif i in added:
            tokens.append(t)
            types.append(TT.CONTROL if added[i].get("special") else TT.USER_DEFINED)
        elif spm and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            tokens.append(t)
            types.append(TT.BYTE)
        else:
            tokens.append(t)
            types.append(TT.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    v = Vocab(model="gpt2", pre="", tokens=tokens, types=[int(t) for t in types],
              add_bos=bool(ids) and bos is not None and ids[0] == bos)
    if spm:
        # SentencePiece-style (Llama 2, Mistral, Gemma): llama.cpp merges the adjacent pair whose
        # result has the highest score; the HF BPE merges the pair of lowest rank. Scoring each
        # token by minus the rank of the merge that makes it gives llama.cpp the same order.
        v.model, v.pre = "llama", "default"
        rank = {}
        for r, m in enumerate(merges):
            a, _, b = m.partition(" ")
            rank.setdefault(a + b, r)
        v.scores = [-float(rank[t]) - 1.0 if t in rank else (0.0 if types[i] == TT.NORMAL else -1000.0)
                    for i, t in enumerate(tokens)]
        if model.get("unk_token") in model["vocab"]:
            v.special["unk"] = model["vocab"][model["unk_token"]]
        norm = json.dumps(tj.get("normalizer"))
        pre = json.dumps(tj.get("pre_tokenizer"))
        v.add_space_prefix = '"Prepend"' in norm or '"prepend_scheme": "always"' in pre
    else:
        v.pre = _pre_tokenizer_name(tj)
        v.merges = merges
    for name in ("bos", "eos", "pad", "unk"):
        tid = getattr(tokenizer, f"{name}_token_id", None)
        if tid is not None and tid >= 0:
            v.special[name] = int(tid)
    return v


# ---- the architectures -------------------------------------------------------------------------------


def _permute_qk(w, n_head: int):
    """HF stores Llama's q/k rows ordered for rotate-half RoPE; llama.cpp's llama graph rotates
    interleaved pairs, so its converter reorders the rows of each head. The same here."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(cfg: dict, layer_type: str = "full_attention") -> float:
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict):
        if layer_type in rp and isinstance(rp[layer_type], dict):
            rp = rp[layer_type]
        if "rope_theta" in rp:
            return float(rp["rope_theta"])
    return float(cfg.get("rope_theta", 10000.0))


def _rope_scaling(cfg: dict, layer_type: str = "full_attention") -> Optional[dict]:
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    if isinstance(rp, dict) and layer_type in rp and isinstance(rp[layer_type], dict):
        rp = rp[layer_type]
    if not isinstance(rp, dict):
        return None
    kind = rp.get("rope_type") or rp.get("type")
    return None if kind in (None, "default") else rp


def _llama3_rope_factors(cfg: dict, rs: dict, head_dim: int):
    """llama3-style RoPE scaling as per-frequency divisors (llama.cpp reads them from a
    `rope_freqs` tensor); the formula of Meta's reference code and transformers'
    _compute_llama3_parameters."""
    import numpy as np

    base = _rope_theta(cfg)
    factor = float(rs.get("factor", 8.0))
    low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
    old_ctx = float(rs.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@dataclass
class Arch:
    gguf_arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False
    norm_plus_one: bool = False  # Gemma's RMSNorm scales by (1 + w); llama.cpp's by w


ARCHES = {
    "llama": Arch("LLAMA", permute_qk=True),
    "mistral": Arch("LLAMA", permute_qk=True),
    "qwen2": Arch("QWEN2"),
    "qwen3": Arch("QWEN3"),
    "gemma2": Arch("GEMMA2", norm_plus_one=True),
    "gemma3": Arch("GEMMA3", norm_plus_one=True),
    "gemma3_text": Arch("GEMMA3", norm_plus_one=True),
}


def check_convertible(config: dict) -> Arch:
    mt = config.get("model_type")
    if mt not in ARCHES:
        names = ", ".join(sorted({k if k != "gemma3_text" else "gemma3" for k in ARCHES}))
        raise UserError(f"snugtune cannot convert a {mt!r} model to GGUF (it converts {names})",
                        hint="export with --merged and convert with llama.cpp's convert_hf_to_gguf.py, if it supports the model")
    if mt == "gemma3" and "text_config" in config:
        raise UserError("this Gemma 3 checkpoint has a vision tower; snugtune converts the text-only model (gemma3_text)",
                        hint="export with --merged and convert with llama.cpp's convert_hf_to_gguf.py")
    return ARCHES[mt]


def _write_arch_keys(w, gguf, cfg: dict, arch: Arch) -> None:
    hidden = int(cfg["hidden_size"])
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    w.add_context_length(int(cfg.get("max_position_embeddings", 4096)))
    w.add_embedding_length(hidden)
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(_rope_theta(cfg))
    if arch.gguf_arch in ("LLAMA", "QWEN2", "QWEN3"):
        w.add_rope_dimension_count(head_dim)
        w.add_vocab_size(int(cfg["vocab_size"]))
    rs = _rope_scaling(cfg)
    if rs is not None:
        kind = rs.get("rope_type") or rs.get("type")
        if kind == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rs["factor"]))
        elif kind == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(rs["factor"]))
            w.add_rope_scaling_orig_ctx_len(int(rs["original_max_position_embeddings"]))
        elif kind == "llama3" and arch.gguf_arch == "LLAMA":
            pass  # written as the rope_freqs tensor
        else:
            raise UserError(f"snugtune's GGUF converter does not handle {kind!r} RoPE scaling",
                            hint="export with --merged and convert with llama.cpp's convert_hf_to_gguf.py")
    if arch.gguf_arch in ("GEMMA2", "GEMMA3"):
        if cfg.get("sliding_window"):
            w.add_sliding_window(int(cfg["sliding_window"]))
    if arch.gguf_arch == "GEMMA3":
        # local (sliding-window) layers rotate with their own base: 10000 in the released models
        rp = cfg.get("rope_parameters")
        if isinstance(rp, dict) and isinstance(rp.get("sliding_attention"), dict):
            w.add_rope_freq_base_swa(_rope_theta(cfg, "sliding_attention"))
        elif cfg.get("rope_local_base_freq"):
            w.add_rope_freq_base_swa(float(cfg["rope_local_base_freq"]))
    if arch.gguf_arch == "GEMMA2":
        if cfg.get("attn_logit_softcapping"):
            w.add_attn_logit_softcapping(float(cfg["attn_logit_softcapping"]))
        if cfg.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))


def _tensors(state: dict, cfg: dict, arch: Arch, gguf) -> Iterable[tuple[str, object]]:
    """(GGUF name, float32 numpy array) for every tensor, in the model's order, transformed for llama.cpp."""
    import numpy as np
    import torch

    n_layers = int(cfg["num_hidden_layers"])
    tmap = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.gguf_arch), n_layers)
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    tied = bool(cfg.get("tie_word_embeddings", False))
    rs = _rope_scaling(cfg)
    if arch.gguf_arch == "LLAMA" and rs is not None and (rs.get("rope_type") or rs.get("type")) == "llama3":
        head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // n_head)
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", _llama3_rope_factors(cfg, rs, head_dim)
    for name, t in state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "lm_head.weight" and tied:
            continue
        new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise UserError(f"snugtune's GGUF converter does not know the tensor {name!r} of this {cfg.get('model_type')} model",
                            hint="export with --merged and convert with llama.cpp's convert_hf_to_gguf.py")
        a = t.detach().to(torch.float32).cpu().numpy()
        if arch.permute_qk and name.endswith("q_proj.weight"):
            a = _permute_qk(a, n_head)
        elif arch.permute_qk and name.endswith("k_proj.weight"):
            a = _permute_qk(a, n_kv)
        if arch.norm_plus_one and name.endswith("norm.weight"):
            a = a + 1.0
        yield new, np.ascontiguousarray(a)


def write_gguf(state: dict, config: dict, vocab: Vocab, out_path: Path, outtype: str = "f16",
               name: str = "", on_tensor: Optional[Callable[[int, int], None]] = None) -> Path:
    """Write `state` (HF names -> tensors) as a GGUF at out_path. outtype: f32, f16 or bf16 for
    the 2-D weights; 1-D tensors (norms, biases) stay f32, as llama.cpp's converter keeps them."""
    import numpy as np

    gguf = _gguf()
    arch = check_convertible(config)
    ga = getattr(gguf.MODEL_ARCH, arch.gguf_arch)
    w = gguf.GGUFWriter(str(out_path), gguf.MODEL_ARCH_NAMES[ga])
    w.add_type("model")
    if name:
        w.add_name(name)
    _write_arch_keys(w, gguf, config, arch)
    ftype = {"f32": 0, "f16": 1, "bf16": 32}[outtype]
    w.add_file_type(ftype)
    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        w.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        w.add_add_space_prefix(vocab.add_space_prefix)
    for key, fn in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                    ("pad", w.add_pad_token_id), ("eot", w.add_eot_token_id)):
        if key in vocab.special:
            fn(vocab.special[key])
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(False)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)

    # Two passes over the tensors, so that only one converted tensor is in memory at a time:
    # the header needs every shape and size first, then the data is streamed.
    def converted(a):
        if a.ndim <= 1 or outtype == "f32":
            return a.astype(np.float32), None
        if outtype == "f16":
            return a.astype(np.float16), None
        # bf16: the top half of each float32 (round to nearest even), as gguf.quants does
        u = a.astype(np.float32).view(np.uint32)
        u = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
        return u, gguf.GGMLQuantizationType.BF16

    count = 0
    for gname, a in _tensors(state, config, arch, gguf):
        if a.ndim <= 1 or outtype == "f32":
            w.add_tensor_info(gname, a.shape, np.dtype(np.float32), a.size * 4)
        elif outtype == "f16":
            w.add_tensor_info(gname, a.shape, np.dtype(np.float16), a.size * 2)
        else:
            w.add_tensor_info(gname, a.shape, np.dtype(np.uint16), a.size * 2, raw_dtype=gguf.GGMLQuantizationType.BF16)
        count += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for i, (gname, a) in enumerate(_tensors(state, config, arch, gguf)):
        data, _ = converted(a)
        if outtype == "f16" and data.dtype == np.float16 and not np.isfinite(data).all():
            w.close()
            raise UserError(f"the weight {gname} overflows float16 (values beyond +-65504)",
                            hint="use --quant bf16, or a k-quant (quantized from a bf16 intermediate)")
        w.write_tensor_data(data)
        if on_tensor:
            on_tensor(i + 1, count)
    w.close()
    return out_path


def quantize(src: Path, dst: Path, quant: str, threads: Optional[int] = None) -> list[str]:
    """llama.cpp's own quantizer (llama_model_quantize) from a 16/32-bit GGUF to `quant`.

    k-quants pack 256 weights a block, so a row whose length is not a multiple of 256 (the demo
    model's 704-wide feed-forward) cannot be a k-quant: llama.cpp then picks a fallback type for
    that tensor itself (q5_0/q5_1/q8_0), so the file is still complete. Returns llama.cpp's
    warnings (such as that fallback), which the caller shows; its per-tensor log is dropped.
    """
    import ctypes

    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTS[quant]
    params.nthread = threads or max(1, (os.cpu_count() or 1))
    log: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        log.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    finally:
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    if rc != 0:
        tail = " ".join("".join(log).strip().splitlines()[-2:])
        raise UserError(f"llama.cpp could not quantize {src.name} to {quant}: {tail or f'error {rc}'}",
                        hint="try --quant q8_0 or f16")
    return [ln.split("WARNING:", 1)[1].strip() for ln in "".join(log).splitlines() if "WARNING:" in ln]


def _load_llama(llama_cpp, path: Path, **kw):
    """llama_cpp.Llama without llama.cpp's "extra buffer types" (weight repacking for AMX and
    friends). On this project's CI machine (a Xeon with AMX, in a VM) the AMX matmul of
    llama.cpp 0.3.36's CPU build segfaults on every quantized GGUF, Gemma's downloaded one too;
    the plain CPU kernels run them. The binding has no argument for it, so its default model
    parameters are adjusted while the model loads."""
    from llama_cpp import llama_cpp as lib

    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=str(path), **kw)
    finally:
        lib.llama_model_default_params = default


def llama_cpp_greedy(path: Path, prompts: list[tuple[str, list[int]]], n_new: int,
                     threads: int = 2) -> list[tuple[list[int], list[int]]]:
    """For each (text, token ids) prompt: llama.cpp's own tokenization of the text (special
    tokens parsed, no BOS added) and its greedy next `n_new` tokens from the given ids, from a
    GGUF through llama.cpp's Python binding: the check that an export runs and answers as the
    merged model does. The model is loaded once."""
    import numpy as np

    llama_cpp = require_llama_cpp()
    n_ctx = max(len(ids) for _, ids in prompts) + n_new + 8
    llm = _load_llama(llama_cpp, path, n_ctx=n_ctx, n_batch=512, n_threads=threads, logits_all=True,
                      verbose=False, seed=0)
    results = []
    try:
        for text, ids in prompts:
            theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            llm.reset()
            llm.eval(ids)
            out: list[int] = []
            for _ in range(n_new):
                nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                out.append(nxt)
                llm.eval([nxt])
            results.append((theirs, out))
    finally:
        llm.close()
    return results


# ---- the chat template --------------------------------------------------------------------------------


def builtin_jinja(kind: str, eos: str) -> str:
    """snugtune's built-in training layout (core/data.py) as a Jinja chat template, for
    tokenizer.chat_template. 'instruction': the Alpaca layout, each user turn an instruction;
    'chat': ### System/User/Assistant headers. The first turn renders exactly as training did;
    later turns follow the trained reply with a blank line, as the chat layout does."""
    e = eos.replace("'", "\\'")
    if kind == "instruction":
        return (
            "{% for m in messages %}"
            "{% if m['role'] == 'system' %}{% if m['content'] | trim %}{{ m['content'] + '\\n\\n' }}{% endif %}"
            "{% elif m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] + '\\n\\n### Response:\\n' }}"
            "{% else %}{{ m['content'] + '" + e + "' + '\\n\\n' }}{% endif %}"
            "{% endfor %}"
        )
    return (
        "{% for m in messages %}"
        "{% if m['role'] == 'assistant' %}{{ '### Assistant:\\n' + m['content'] + '" + e + "' + '\\n\\n' }}"
        "{% elif m['role'] == 'system' %}{{ '### System:\\n' + m['content'] + '\\n\\n' }}"
        "{% else %}{{ '### User:\\n' + m['content'] + '\\n\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
    )


def builtin_go_template(kind: str, eos: str) -> str:
    """The same layout in Ollama's Go-template syntax (a Modelfile TEMPLATE). The system prompt
    comes from `.System` (Ollama's SYSTEM line, or the conversation's system messages). No
    `{{-` trim markers: they would also eat the blank lines the layout needs."""
    if kind == "instruction":
        return (
            '{{ if .System }}{{ .System }}\n\n{{ end }}'
            '{{ range .Messages }}'
            '{{ if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n### Response:\n'
            '{{ else if eq .Role "assistant" }}{{ .Content }}' + eos + '\n\n{{ end }}'
            '{{ end }}'
        )
    return (
        '{{ if .System }}### System:\n{{ .System }}\n\n{{ end }}'
        '{{ range .Messages }}'
        '{{ if eq .Role "assistant" }}### Assistant:\n{{ .Content }}' + eos + '\n\n'
        '{{ else if eq .Role "user" }}### User:\n{{ .Content }}\n\n{{ end }}'
        '{{ end }}### Assistant:\n'
    )
