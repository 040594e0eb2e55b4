"""Model specs: the numbers that decide memory and speed, from the built-in catalog, the Hub,
the local Hugging Face cache, or a local model directory.

No torch here (the wizard uses it in-process). Hub access lives in core/hub.py and imports
huggingface_hub lazily.
"""
from __future__ import annotations

import difflib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

from core.errors import UserError
from core.hub import HubAccessDenied, HubNotFound, HubUnreachable  # noqa: F401  (re-exported: callers catch them here)

# Architectures whose layer layout the estimator knows exactly. Others with the usual config
# keys are treated as Llama-like (and flagged `exact=False`, which widens the estimate's margin).
KNOWN_ARCHITECTURES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "stablelm", "smollm3",
    "olmo2", "granite", "cohere",
)


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only model and the exact parameter counts that follow from it."""

    id: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    # Layout details that change parameter counts and activation memory.
    qkv_bias: bool = False  # Qwen2, StableLM 2: biases on q/k/v
    o_bias: bool = False
    mlp_bias: bool = False
    norm: str = "rms"  # "rms" (weight only) or "layer" (weight and bias)
    norms_per_layer: int = 2  # Gemma 2/3 have four (pre/post attention, pre/post MLP)
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head's q and k
    fused_qkv: bool = False  # Phi-3: one qkv_proj and one gate_up_proj
    gated_mlp: bool = True  # SwiGLU/GeGLU: gate, up, down; False: up, down
    final_logit_softcap: Optional[float] = None  # Gemma 2: tanh softcap keeps one more vocab-wide tensor
    source: str = "catalog"  # "catalog" | "hub" | "cache" | "local" | "builtin"
    exact: bool = True  # False: shape guessed (unknown architecture or parameter count only)
    note: str = ""
    # Hub metadata, when known.
    downloads: Optional[int] = None
    likes: Optional[int] = None
    last_modified: Optional[str] = None
    gated: Optional[bool] = None
    size_gib: Optional[float] = None  # bytes on disk of the weights (16-bit checkpoint), when known
    hub_params: Optional[int] = None  # parameter count from the Hub's safetensors metadata

    # ---- the linear layers inside one decoder block (what bitsandbytes quantizes) --------------

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> list[tuple[str, int, int]]:
        """(module name, in features, out features) of each linear layer of one block."""
        h, i = self.hidden_size, self.intermediate_size
        if self.fused_qkv:
            attn = [("qkv_proj", h, self.q_dim + 2 * self.kv_dim)]
        else:
            attn = [("q_proj", h, self.q_dim), ("k_proj", h, self.kv_dim), ("v_proj", h, self.kv_dim)]
        attn.append(("o_proj", self.q_dim, h))
        if self.fused_qkv and self.gated_mlp:
            mlp = [("gate_up_proj", h, 2 * i), ("down_proj", i, h)]
        elif self.gated_mlp:
            mlp = [("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]
        else:
            mlp = [("up_proj", h, i), ("down_proj", i, h)]
        return attn + mlp

    @property
    def params_quantizable(self) -> int:
        """Weights of the linear layers inside the decoder blocks (4-bit in QLoRA)."""
        return self.num_layers * sum(a * b for _, a, b in self.linear_shapes())

    @property
    def params_embedding(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def params_head(self) -> int:
        """The output layer's own weights: 0 when tied to the embedding."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def params_biases(self) -> int:
        per = 0
        if self.qkv_bias:
            per += self.q_dim + 2 * self.kv_dim
        if self.o_bias:
            per += self.hidden_size
        if self.mlp_bias:
            per += (2 * self.intermediate_size if self.gated_mlp else self.intermediate_size) + self.hidden_size
        return self.num_layers * per

    @property
    def params_norms(self) -> int:
        width = 2 if self.norm == "layer" else 1  # LayerNorm has a bias beside its weight
        per = self.norms_per_layer * self.hidden_size * width
        if self.qk_norm:
            per += 2 * self.head_dim
        return self.num_layers * per + self.hidden_size * width  # + the final norm

    @property
    def params_other(self) -> int:
        """Everything not quantized: embeddings, norms, untied head, biases (16-bit, or fp32 after
        prepare_model_for_kbit_training in the plain recipe)."""
        return self.params_embedding + self.params_head + self.params_norms + self.params_biases

    @property
    def params_total(self) -> int:
        return self.params_quantizable + self.params_other

    def lora_params(self, r: int, targets: "str | list[str]" = "all-linear") -> int:
        """Trainable LoRA parameters: r x (in + out) per targeted linear layer, all blocks."""
        return self.num_layers * sum(r * (a + b) for name, a, b in self.targeted(targets))

    def targeted(self, targets: "str | list[str]" = "all-linear") -> list[tuple[str, int, int]]:
        shapes = self.linear_shapes()
        if targets == "all-linear":
            return shapes
        wanted = set(targets)
        # A list written for split projections still means the fused ones on Phi-3, and vice versa.
        alias = {"qkv_proj": {"q_proj", "k_proj", "v_proj"}, "gate_up_proj": {"gate_proj", "up_proj"}}
        out = []
        for name, a, b in shapes:
            if name in wanted or alias.get(name, set()) & wanted:
                out.append((name, a, b))
        return out

    @property
    def size_label(self) -> str:
        # a guessed shape shows the Hub's own count, not the guess's
        n = self.hub_params if (not self.exact and self.hub_params) else self.params_total
        # one decimal below 100M and from 0.95B (3.5M, 1.0B, 1.5B; not 3M or 1000M), as the wizard shows it
        if n >= 0.95e9:
            return f"{n / 1e9:.1f}B"
        return f"{n / 1e6:.1f}M" if n < 100e6 else f"{n / 1e6:.0f}M"

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            params_quantizable=self.params_quantizable,
            params_other=self.params_other,
            params_total=self.params_total,
        )
        return d


# ---- the built-in catalog ------------------------------------------------------------------------
# Numbers are each model's config.json on the Hub (hidden_size, num_hidden_layers,
# num_attention_heads, num_key_value_heads, head_dim, intermediate_size, vocab_size,
# tie_word_embeddings, max_position_embeddings). Six agree with /work/shared/reference/qlora_probe.py.

def _spec(id, mt, h, layers, heads, kv, inter, vocab, tied, maxpos, head_dim=None, **kw) -> ModelSpec:
    return ModelSpec(
        id=id, model_type=mt, hidden_size=h, num_layers=layers, num_heads=heads, num_kv_heads=kv,
        head_dim=head_dim or h // heads, intermediate_size=inter, vocab_size=vocab, tie_word_embeddings=tied,
        max_position_embeddings=maxpos, source=kw.pop("source", "catalog"), **kw,
    )


_QWEN2 = dict(qkv_bias=True)
_QWEN3 = dict(qk_norm=True)
_GEMMA2 = dict(norms_per_layer=4, final_logit_softcap=30.0)
_GEMMA3 = dict(norms_per_layer=4, qk_norm=True)
_STABLELM2 = dict(norm="layer", qkv_bias=True)
_PHI3 = dict(fused_qkv=True)

_CATALOG: list[ModelSpec] = [
    _spec("HuggingFaceTB/SmolLM2-135M", "llama", 576, 30, 9, 3, 1536, 49152, True, 8192),
    _spec("HuggingFaceTB/SmolLM2-360M", "llama", 960, 32, 15, 5, 2560, 49152, True, 8192),
    _spec("Qwen/Qwen2.5-0.5B", "qwen2", 896, 24, 14, 2, 4864, 151936, True, 32768, **_QWEN2),
    _spec("Qwen/Qwen2.5-0.5B-Instruct", "qwen2", 896, 24, 14, 2, 4864, 151936, True, 32768, **_QWEN2),
    _spec("Qwen/Qwen3-0.6B-Base", "qwen3", 1024, 28, 16, 8, 3072, 151936, True, 32768, head_dim=128, **_QWEN3),
    _spec("google/gemma-3-1b-pt", "gemma3_text", 1152, 26, 4, 1, 6912, 262144, True, 32768, head_dim=256, **_GEMMA3),
    _spec("meta-llama/Llama-3.2-1B", "llama", 2048, 16, 32, 8, 8192, 128256, True, 131072, head_dim=64),
    _spec("meta-llama/Llama-3.2-1B-Instruct", "llama", 2048, 16, 32, 8, 8192, 128256, True, 131072, head_dim=64),
    _spec("TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", "llama", 2048, 22, 32, 4, 5632, 32000, False, 2048),
    _spec("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "llama", 2048, 22, 32, 4, 5632, 32000, False, 2048),
    _spec("Qwen/Qwen2.5-1.5B", "qwen2", 1536, 28, 12, 2, 8960, 151936, True, 131072, **_QWEN2),
    _spec("Qwen/Qwen2.5-1.5B-Instruct", "qwen2", 1536, 28, 12, 2, 8960, 151936, True, 32768, **_QWEN2),
    _spec("stabilityai/stablelm-2-1_6b", "stablelm", 2048, 24, 32, 32, 5632, 100352, False, 4096, **_STABLELM2),
    _spec("HuggingFaceTB/SmolLM2-1.7B", "llama", 2048, 24, 32, 32, 8192, 49152, True, 8192),
    _spec("HuggingFaceTB/SmolLM2-1.7B-Instruct", "llama", 2048, 24, 32, 32, 8192, 49152, True, 8192),
    _spec("Qwen/Qwen3-1.7B-Base", "qwen3", 2048, 28, 16, 8, 6144, 151936, True, 32768, head_dim=128, **_QWEN3),
    _spec("google/gemma-2-2b", "gemma2", 2304, 26, 8, 4, 9216, 256000, True, 8192, head_dim=256, **_GEMMA2),
    _spec("Qwen/Qwen2.5-3B", "qwen2", 2048, 36, 16, 2, 11008, 151936, True, 32768, **_QWEN2),
    _spec("Qwen/Qwen2.5-3B-Instruct", "qwen2", 2048, 36, 16, 2, 11008, 151936, True, 32768, **_QWEN2),
    _spec("meta-llama/Llama-3.2-3B", "llama", 3072, 28, 24, 8, 8192, 128256, True, 131072, head_dim=128),
    _spec("meta-llama/Llama-3.2-3B-Instruct", "llama", 3072, 28, 24, 8, 8192, 128256, True, 131072, head_dim=128),
    _spec("microsoft/Phi-3.5-mini-instruct", "phi3", 3072, 32, 32, 32, 8192, 32064, False, 131072, **_PHI3),
    # 7-9B: for 8-12 GB cards (core/bigsavers.py keeps their 1-2 GB embeddings and heads off the card)
    _spec("mistralai/Mistral-7B-v0.3", "mistral", 4096, 32, 32, 8, 14336, 32768, False, 32768, head_dim=128),
    _spec("Qwen/Qwen2.5-7B", "qwen2", 3584, 28, 28, 4, 18944, 152064, False, 131072, **_QWEN2),
    _spec("Qwen/Qwen2.5-7B-Instruct", "qwen2", 3584, 28, 28, 4, 18944, 152064, False, 32768, **_QWEN2),
    _spec("meta-llama/Llama-3.1-8B", "llama", 4096, 32, 32, 8, 14336, 128256, False, 131072, head_dim=128),
    _spec("meta-llama/Llama-3.1-8B-Instruct", "llama", 4096, 32, 32, 8, 14336, 128256, False, 131072, head_dim=128),
    _spec("Qwen/Qwen3-8B-Base", "qwen3", 4096, 36, 32, 8, 12288, 151936, False, 32768, head_dim=128, **_QWEN3),
    _spec("Qwen/Qwen3-8B", "qwen3", 4096, 36, 32, 8, 12288, 151936, False, 40960, head_dim=128, **_QWEN3),
    _spec("google/gemma-2-9b", "gemma2", 3584, 42, 16, 8, 14336, 256000, True, 8192, head_dim=256, **_GEMMA2),
]

# The offline demo model core/demo.py builds (tiny_llama_config()): trains on a CPU in seconds.
TINY_LLAMA = _spec("builtin:tiny-llama", "llama", 256, 4, 4, 2, 704, 2048, True, 2048, source="builtin")

GATED_IN_CATALOG = {"meta-llama/", "google/gemma"}


def builtin_catalog() -> list[ModelSpec]:
    """The offline catalog: popular small models with their real config numbers, plus the demo model."""
    out = []
    for s in _CATALOG + [TINY_LLAMA]:
        gated = any(s.id.startswith(p) for p in GATED_IN_CATALOG)
        out.append(replace(s, gated=gated, size_gib=round(s.params_total * 2 / 2**30, 2)))
    return out


def catalog_lookup(model_id: str) -> Optional[ModelSpec]:
    key = model_id.strip().lower()
    for s in builtin_catalog():
        if s.id.lower() == key:
            return s
    return None


def close_matches(model_id: str, n: int = 3) -> list[str]:
    ids = [s.id for s in builtin_catalog()]
    by_lower = {i.lower(): i for i in ids}
    tail = {i.split("/")[-1].lower(): i for i in ids}
    key = model_id.lower()
    hits = [by_lower[h] for h in difflib.get_close_matches(key, list(by_lower), n=n, cutoff=0.6)]
    hits += [tail[t] for t in difflib.get_close_matches(key.split("/")[-1], list(tail), n=n, cutoff=0.6)]
    out: list[str] = []
    for real in hits:
        if real not in out:
            out.append(real)
    return out[:n]


# ---- from a config.json ---------------------------------------------------------------------------

def spec_from_config(config: dict, id: str, source: str = "hub") -> ModelSpec:
    """A ModelSpec from a transformers config.json dict. Multimodal configs use their text_config.

    Raises UserError when the config lacks the numbers needed (say which).
    """
    cfg = dict(config)
    if isinstance(cfg.get("text_config"), dict) and "hidden_size" not in cfg:
        cfg = {**cfg["text_config"], "tie_word_embeddings": cfg.get("tie_word_embeddings", cfg["text_config"].get("tie_word_embeddings"))}
    mt = str(cfg.get("model_type") or "unknown")
    alias = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
             "d_model": "hidden_size", "num_layers": "num_hidden_layers", "n_positions": "max_position_embeddings"}
    for old, new in alias.items():
        if old in cfg and new not in cfg:
            cfg[new] = cfg[old]
    need = ["hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]
    missing = [k for k in need if not isinstance(cfg.get(k), int) or cfg.get(k) <= 0]
    if missing:
        raise UserError(
            f"{id}: config.json lacks {', '.join(missing)} (model_type {mt!r}); cannot read the model's shape",
        )
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or h // heads
    inter = cfg.get("intermediate_size") or cfg.get("n_inner") or cfg.get("ffn_dim") or 4 * h
    kw: dict = {}
    exact = mt in KNOWN_ARCHITECTURES
    note = "" if exact else f"architecture {mt!r} is not known to the estimator; assumed Llama-like layers (wider margin)"
    if mt == "qwen2":
        kw.update(qkv_bias=True)
    elif mt == "qwen3":
        kw.update(qk_norm=True)
    elif mt == "gemma2":
        kw.update(norms_per_layer=4, final_logit_softcap=cfg.get("final_logit_softcapping"))
    elif mt in ("gemma3_text", "gemma3"):
        kw.update(norms_per_layer=4, qk_norm=True, final_logit_softcap=cfg.get("final_logit_softcapping"))
    elif mt == "stablelm":
        kw.update(norm="layer", qkv_bias=bool(cfg.get("use_qkv_bias", False)))
    elif mt == "phi3":
        kw.update(fused_qkv=True)
    elif mt in ("llama", "mistral", "granite", "olmo2", "smollm3"):
        kw.update(qkv_bias=bool(cfg.get("attention_bias", False)), o_bias=bool(cfg.get("attention_bias", False)),
                  mlp_bias=bool(cfg.get("mlp_bias", False)))
        if mt == "olmo2":
            kw.update(qk_norm=True)
    tied = cfg.get("tie_word_embeddings")
    if tied is None:
        tied = mt.startswith("gemma")  # transformers' default is tied for Gemma, untied otherwise... mostly
    return ModelSpec(
        id=id, model_type=mt, hidden_size=h, num_layers=cfg["num_hidden_layers"], num_heads=heads,
        num_kv_heads=kv, head_dim=head_dim, intermediate_size=inter, vocab_size=cfg["vocab_size"],
        tie_word_embeddings=bool(tied), max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
        source=source, exact=exact, note=note, **kw,
    )


def spec_from_param_count(id: str, n_params: int, source: str = "hub", note: str = "") -> ModelSpec:
    """A guessed shape for a model known only by its parameter count (no usable config).

    Shapes of the catalog's models scale roughly as: hidden ~ sqrt(params / 250), 4x MLP-ish
    (SwiGLU 2.7x h, 3 matrices), a 128k vocabulary (pessimistic: large vocabularies cost the
    most memory). The estimator treats such a spec with a wider margin (exact=False).
    """
    vocab = 128256
    body = max(n_params - vocab * 1024, n_params // 2)
    h = 256
    while h < 8192:
        layers = max(2, round(body / (h * h * 12.0)))
        if layers <= 40:
            break
        h += 256
    inter = int(round(h * 2.75 / 64) * 64)
    return ModelSpec(
        id=id, model_type="unknown", hidden_size=h, num_layers=layers, num_heads=max(1, h // 64),
        num_kv_heads=max(1, h // 64), head_dim=64, intermediate_size=inter, vocab_size=vocab,
        tie_word_embeddings=True, max_position_embeddings=8192, source=source, exact=False,
        note=note or f"shape guessed from the parameter count ({n_params / 1e9:.2f}B); estimate has a wider margin",
        hub_params=n_params,
    )


# ---- local directories and the HF cache ----------------------------------------------------------

def hf_cache_dir() -> Path:
    """Where huggingface_hub keeps models, read from the environment now (HF_HUB_CACHE, HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read the model's config.json ({exc})") from None


def _dir_weight_bytes(path: Path) -> int:
    total = 0
    for p in path.iterdir():
        if p.suffix in (".safetensors", ".bin") and p.is_file():
            total += p.stat().st_size
    return total


def spec_from_dir(path: str | Path, source: str = "local", id: str | None = None) -> ModelSpec:
    path = Path(path).expanduser()
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{path}: no config.json in this directory; is it a transformers model directory?")
    spec = spec_from_config(_read_config(cfg_path), id or str(path), source=source)
    size = _dir_weight_bytes(path)
    return replace(spec, size_gib=round(size / 2**30, 2) if size else None)


def _cache_snapshot(model_id: str) -> Optional[Path]:
    repo = hf_cache_dir() / ("models--" + model_id.replace("/", "--"))
    snaps = repo / "snapshots"
    if not snaps.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        cand = snaps / ref.read_text().strip()
        if (cand / "config.json").is_file():
            return cand
    for cand in sorted(snaps.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
        if (cand / "config.json").is_file():
            return cand
    return None


def scan_cache() -> list[ModelSpec]:
    """Models in the local Hugging Face cache that have a config.json (weights may be absent)."""
    root = hf_cache_dir()
    if not root.is_dir():
        return []
    out = []
    for repo in sorted(root.glob("models--*")):
        model_id = repo.name[len("models--"):].replace("--", "/")
        snap = _cache_snapshot(model_id)
        if snap is None:
            continue
        try:
            spec = spec_from_dir(snap, source="cache", id=model_id)
        except UserError:
            continue
        blobs = repo / "blobs"
        size = sum(p.stat().st_size for p in blobs.iterdir() if p.is_file()) if blobs.is_dir() else 0
        out.append(replace(spec, size_gib=round(size / 2**30, 2)))
    return out


# ---- resolving an id or a path --------------------------------------------------------------------

def _offline_default() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def resolve_model(id_or_path: str, offline: bool | None = None, revision: str | None = None) -> ModelSpec:
    """catalog -> local directory -> HF cache -> Hub config.json (unless offline).

    Unknown everywhere: UserError naming close catalog matches. Hub unreachable: HubUnreachable.
    """
    from core import hub  # light module; huggingface_hub itself is imported inside its functions

    name = (id_or_path or "").strip()
    if not name:
        raise UserError("no model given; pass a Hub id such as Qwen/Qwen2.5-0.5B or a model directory")
    if name in ("builtin:tiny-llama", "tiny-llama", "demo"):
        return catalog_lookup("builtin:tiny-llama")
    spec = catalog_lookup(name)
    if spec is not None:
        return spec
    p = Path(name).expanduser()
    if p.is_dir():
        return spec_from_dir(p)
    if p.is_file() or name.lower().endswith(".gguf"):
        return spec_from_gguf_path(p)
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise UserError(f"{name}: no such model directory", hint="check the path, or give a Hub id like owner/name")
    snap = _cache_snapshot(name)
    if snap is not None:
        return spec_from_dir(snap, source="cache", id=name)
    if offline is None:
        offline = _offline_default()
    close = close_matches(name)
    suggestion = f"did you mean {', '.join(close)}? " if close else ""
    if "/" not in name:
        raise UserError(
            f"unknown model {name!r}: not in the catalog, not a directory, and not a Hub id (owner/name)",
            hint=f"{suggestion}see `snugtune models`",
        )
    if offline:
        raise UserError(
            f"model {name!r} is not in the catalog or the local cache, and the Hub is off (HF_HUB_OFFLINE)",
            hint=f"{suggestion}see `snugtune models --source catalog`",
        )
    try:
        return hub.fetch_spec(name, revision=revision)
    except hub.HubUnreachable as exc:
        raise hub.HubUnreachable(
            f"model {name!r} is not in the catalog or the local cache, and {exc.message}",
            hint=f"{suggestion}see `snugtune models --source catalog`" if suggestion else exc.hint,
        ) from None
    except hub.HubNotFound:
        raise UserError(
            f"unknown model {name!r}: not in the catalog, the local cache, or on the Hub",
            hint=f"{suggestion}see `snugtune models --search TEXT`",
        ) from None


def search_hub(text: str = "", sort: str = "downloads", limit: int = 20) -> list[ModelSpec]:
    """Text-generation models on the Hub matching `text` (see core.hub.search_models)."""
    from core import hub

    return hub.search_models(text, sort=sort, limit=limit)


# ---- GGUF files (llama.cpp, Ollama, LM Studio) -----------------------------------------------------

def spec_from_gguf_path(p: Path) -> ModelSpec:
    """A model named by a file: a GGUF file (any name: Ollama's blobs have no extension)."""
    from core import gguf_source

    if not p.exists():
        raise UserError(f"{p}: no such file", hint="check the path of the .gguf file")
    if not gguf_source.is_gguf_file(p):
        raise UserError(f"{p} is a file but not a GGUF model (it does not start with 'GGUF')",
                        hint="a model is a directory with config.json, a .gguf file, or a Hub id")
    return gguf_source.spec_from_gguf(p)


def scan_gguf(folders=(), include_apps: bool = True) -> list[ModelSpec]:
    """GGUF models in `folders` (a folder the user names) and in Ollama's and LM Studio's model
    folders when present; each spec's id is the file path to train from, its note says which
    model it is (Ollama's model:tag, or the file's own name and quantization)."""
    from core import gguf_source

    out = []
    for found in gguf_source.find_gguf_models(folders, include_apps=include_apps):
        where = {"ollama": "Ollama", "lmstudio": "LM Studio"}.get(found.where, "")
        try:
            out.append(gguf_source.spec_from_gguf(found.path, note=f"{where} {found.label}".strip()))
        except UserError:
            continue  # an unreadable or partial download is skipped, not an error of the listing
    return out


def search_catalog(text: str = "") -> list[ModelSpec]:
    key = text.lower().strip()
    return [s for s in builtin_catalog() if not key or key in s.id.lower() or key in s.model_type]
