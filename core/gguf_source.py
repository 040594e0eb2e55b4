"""A local GGUF file (llama.cpp, Ollama, LM Studio) as a model source.

Users who run llama.cpp or Ollama have GGUF files, not safetensors. A GGUF path works wherever a
model is named (model.name_or_path, estimate, data inspect, train, chat, export):

* its shape comes from the file's metadata (spec_from_gguf: torch-free, for the catalog,
  the wizard and the estimator; the `gguf` package reads the header, the weights are not read);
* for training, chat and export it is dequantized once with transformers' GGUF support
  (`from_pretrained(dir, gguf_file=...)`) into a 16-bit model directory in snugtune's cache
  (ensure_converted: config.json, safetensors, the tokenizer and its chat template, all taken
  from the file), which then loads like any local model: NF4 on the GPU as usual. The cached
  copy is keyed by the file's path, size and modification time, so an edited file is
  converted again; it costs 2 bytes a parameter of disk (0.5 GB for Gemma 3 270M) and the
  conversion holds the 16-bit model in RAM once.

The catalog lists GGUF files in a folder the user names and in the Ollama and LM Studio model
folders when present (find_gguf_models). Ollama keeps GGUFs as extension-less blobs named by
their sha256; its manifests say which blob is which model:tag.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from core.errors import UserError

MAGIC = b"GGUF"
# general.architecture -> transformers model_type (the families transformers' GGUF loader maps)
ARCH_TO_MODEL_TYPE = {
    "llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
    "gemma2": "gemma2", "gemma3": "gemma3_text", "phi3": "phi3", "stablelm": "stablelm", "olmo2": "olmo2",
    "granite": "granite", "cohere": "cohere", "falcon": "falcon", "gpt2": "gpt2", "starcoder2": "starcoder2",
    "mamba": "mamba", "nemotron": "nemotron", "t5": "t5", "deci": "deci", "qwen2moe": "qwen2_moe",
}
OLLAMA_MODEL_MEDIA = "application/vnd.ollama.image.model"
CONVERT_VERSION = 1  # bump when the converted directory's layout changes


def is_gguf_file(path: str | os.PathLike) -> bool:
    """A regular file that starts with GGUF's magic bytes (Ollama's blobs have no extension)."""
    p = Path(path).expanduser()
    try:
        if not p.is_file():
            return False
        with open(p, "rb") as fh:
            return fh.read(4) == MAGIC
    except OSError:
        return False


def looks_like_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf")


# GGUF value types (gguf spec): id -> struct format of a scalar; 8 = string, 9 = array
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
# ggml tensor type ids -> names (the ones llama.cpp writes; others are shown by number)
_GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
               11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
               18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8",
               25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16"}
# Arrays longer than this are summarised by their length (vocabularies, merges, scores).
_ARRAY_KEEP = 64


class _Header:
    """A minimal reader of a GGUF header (key/values and tensor infos), pure Python.

    The `gguf` package's reader parses every vocabulary string into numpy objects (seconds for a
    262k vocabulary); listing models only needs the shape numbers, so this walks the header once
    and skips the long arrays' contents."""

    def __init__(self, fh):
        import struct

        self.fh, self.struct = fh, struct

    def read(self, fmt: str):
        size = self.struct.calcsize("<" + fmt)
        data = self.fh.read(size)
        if len(data) != size:
            raise EOFError("the file ends inside its header")
        return self.struct.unpack("<" + fmt, data)[0]

    def string(self) -> str:
        n = self.read("Q")
        if n > 1 << 26:
            raise ValueError(f"string of {n} bytes")
        return self.fh.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALAR:
            return self.read(_SCALAR[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, count = self.read("I"), self.read("Q")
            if etype in _SCALAR and count > _ARRAY_KEEP:
                self.fh.seek(count * self.struct.calcsize("<" + _SCALAR[etype]), 1)
                return _Count(count)
            if etype == 8 and count > _ARRAY_KEEP:
                for _ in range(count):  # each string is length-prefixed: walk, do not decode
                    self.fh.seek(self.read("Q"), 1)
                return _Count(count)
            return [self.value(etype) for _ in range(count)]
        raise ValueError(f"unknown GGUF value type {vtype}")


def _tensor_bytes(ggml_type: int, dims: list[int]) -> Optional[int]:
    """The bytes a tensor takes in the data section (ggml's block size and bytes a block, from the
    gguf package), or None when the type or the package is unknown here."""
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ImportError, ValueError, KeyError):
        return None
    n = 1
    for d in dims:
        n *= d
    return n // block * size


class _Count(int):
    """A long array, kept as its length."""


def read_metadata(path: str | os.PathLike) -> dict:
    """The header's key/values (long arrays reduced to their length, under KEY.count) and the
    tensors' shapes (`_tensors`) and quantization types (`_quant`). Reads no weights."""
    p = Path(path).expanduser()
    meta: dict = {}
    try:
        with open(p, "rb") as fh:
            h = _Header(fh)
            if fh.read(4) != MAGIC:
                raise ValueError("no GGUF magic")
            version = h.read("I")
            if version < 2:
                raise ValueError(f"GGUF version {version} (llama.cpp before August 2023) is not supported")
            n_tensors, n_kv = h.read("Q"), h.read("Q")
            for _ in range(n_kv):
                key = h.string()
                v = h.value(h.read("I"))
                if isinstance(v, _Count):
                    meta[key + ".count"] = int(v)
                else:
                    meta[key] = v
            tensors, quant, data_end = {}, set(), 0
            for _ in range(n_tensors):
                name = h.string()
                dims = [h.read("Q") for _ in range(h.read("I"))]
                t = h.read("I")
                offset = h.read("Q")  # into the data section
                tensors[name] = dims
                quant.add(_GGML_TYPES.get(t, str(t)))
                nbytes = _tensor_bytes(t, dims)
                data_end = None if nbytes is None or data_end is None else max(data_end, offset + nbytes)
            header_end = fh.tell()
    except (OSError, EOFError, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{p}: not a readable GGUF file ({exc})",
                        hint="check that the download finished (compare its size or sha256 with the source)") from None
    # A download or copy cut short keeps a whole header and loses weights at the end: without this
    # check transformers fails deep inside ("cannot reshape array of size 123688 into shape ...").
    align = meta.get("general.alignment", 32) if isinstance(meta.get("general.alignment", 32), int) else 32
    if data_end is not None and align > 0:
        need = -(-header_end // align) * align + data_end
        have = p.stat().st_size
        if have < need:
            raise UserError(f"{p}: the file is cut short: {have:,} bytes, where its header says the weights "
                            f"end at byte {need:,} ({(need - have) / 2**20:,.1f} MiB missing)",
                            hint="the download or copy did not finish: fetch the file again (compare its size "
                            "or sha256 with the source)")
    meta["_tensors"], meta["_quant"] = tensors, sorted(quant)
    meta["GGUF.version"] = version
    return meta


def config_from_metadata(meta: dict) -> dict:
    """A transformers-style config dict (the keys core.catalog.spec_from_config reads)."""
    arch = str(meta.get("general.architecture") or "")
    mt = ARCH_TO_MODEL_TYPE.get(arch, arch or "unknown")

    def g(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    heads = g("attention.head_count")
    if isinstance(heads, list):  # per-layer head counts (some architectures): the largest
        heads = max(heads)
    kv = g("attention.head_count_kv", heads)
    if isinstance(kv, list):
        kv = max(kv)
    tensors = meta.get("_tensors", {})
    vocab = meta.get("tokenizer.ggml.tokens.count")
    emb = tensors.get("token_embd.weight")
    if emb:
        vocab = int(emb[-1])  # GGUF stores (hidden, vocab): the embedding's real row count
    cfg = {
        "model_type": mt,
        "hidden_size": g("embedding_length"),
        "num_hidden_layers": g("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": g("attention.key_length"),
        "intermediate_size": g("feed_forward_length"),
        "vocab_size": vocab,
        "max_position_embeddings": g("context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": any(n.endswith("attn_q.bias") for n in tensors),
    }
    if mt == "gemma2":
        cfg["final_logit_softcapping"] = g("final_logit_softcapping", 30.0)
    if isinstance(cfg["intermediate_size"], list):
        cfg["intermediate_size"] = max(cfg["intermediate_size"])
    return {k: v for k, v in cfg.items() if v is not None}


def spec_from_gguf(path: str | os.PathLike, id: Optional[str] = None, note: str = ""):
    """A ModelSpec from a GGUF file's header (no torch, no weights read)."""
    from dataclasses import replace

    from core.catalog import spec_from_config

    p = Path(path).expanduser().resolve()
    meta = read_metadata(p)
    spec = spec_from_config(config_from_metadata(meta), id=id or str(p), source="gguf")
    name = meta.get("general.name")
    quant = ",".join(q for q in meta.get("_quant", []) if q not in ("F32",))
    bits = f"GGUF {quant}" if quant else "GGUF"
    extra = f"{name} ({bits})" if name else bits
    return replace(spec, size_gib=round(p.stat().st_size / 2**30, 2),
                   note="; ".join(x for x in (note, extra, spec.note) if x))


# ---- conversion for training ------------------------------------------------------------------------

def _cache_root() -> Path:
    from core.demo import cache_dir

    return cache_dir() / "gguf"


def converted_dir(path: str | os.PathLike) -> Path:
    """Where the 16-bit copy of this GGUF file lives (whether or not it exists yet)."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    key = hashlib.sha256(f"{p}|{st.st_size}|{st.st_mtime_ns}|{CONVERT_VERSION}".encode()).hexdigest()[:16]
    stem = p.name[:-5] if looks_like_gguf(p.name) else p.name[:19]
    return _cache_root() / f"{stem}-{key}"


# transformers before 5.24 builds a GGUF's SentencePiece tokenizer wrongly: on Gemma 3 270M's file,
# 5.17 splits "Instruction" into "_In st ru ct ion" and adds no <bos> where 5.24 gives
# "_Instruction" and <bos> (measured here; bench/real_weights.py's H200 runs 1-2 ran on 5.17).
GGUF_TOKENIZER_MIN_TRANSFORMERS = (5, 24)


def _check_transformers_for(p: Path) -> None:
    import transformers

    got = tuple(int(x) for x in transformers.__version__.split(".")[:2] if x.isdigit())
    if got < GGUF_TOKENIZER_MIN_TRANSFORMERS and read_metadata(p).get("tokenizer.ggml.model") == "llama":
        need = ".".join(map(str, GGUF_TOKENIZER_MIN_TRANSFORMERS))
        raise UserError(f"{p}: transformers {transformers.__version__} reads this GGUF file's SentencePiece "
                        "tokenizer wrongly (words split into pieces, no BOS), so training would not see the "
                        "text as the model does",
                        hint=f"pip install 'transformers>={need}'")


def _check_architecture(p: Path, meta: dict) -> None:
    """A GGUF of an architecture transformers' GGUF loader does not map (rwkv, bitnet, deepseek2 ...)
    is said by its name before anything loads; transformers' own words come from deep inside the
    tokenizer's or the model's loading and name neither the fix nor what it does read."""
    arch = str(meta.get("general.architecture") or "")
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:
        return
    import transformers

    supported = {a.replace("_", "") for a in GGUF_SUPPORTED_ARCHITECTURES}
    if arch and arch.replace("_", "") not in supported:
        known = ", ".join(sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")))
        raise UserError(f"{p}: a GGUF of architecture {arch!r}, which transformers {transformers.__version__} "
                        f"cannot dequantize (it reads {known})",
                        hint="train from the model's original weights (its Hub repository or a safetensors "
                        "folder), or pick a GGUF of one of those architectures")


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer and chat template of a GGUF file, without converting its weights."""
    p = Path(path).expanduser().resolve()
    _check_architecture(p, read_metadata(p))  # a cut or foreign file is said here, not by transformers
    _check_transformers_for(p)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise UserError(f"{p}: transformers cannot read this GGUF file's tokenizer "
                        f"({str(exc).splitlines()[0][:200]})") from None
    template = read_metadata(p).get("tokenizer.chat_template")
    if isinstance(template, str) and template.strip() and not getattr(tok, "chat_template", None):
        tok.chat_template = template
    return tok


@contextlib.contextmanager
def _quiet_bars(progress: Optional[Callable[[str], None]]):
    """transformers' own progress bars off while it dequantizes: its tqdm bar ("Converting and
    de-quantizing GGUF tensors...", redrawn ~50 times) and its "Loading weights" bar filled `snugtune
    train`'s terminal, and the wizard's engine.log and error tails with carriage-return lines. In
    their place a line at each quarter of the tensors through `progress`, as the rest of setup says.
    Saving the dense copy runs under it too (its "Writing model shards" bar).

    The GGUF loader calls tqdm.auto.tqdm by the name its module imported (not transformers' logging
    tqdm, which disable_progress_bar turns off), so that name is swapped for the conversion."""
    from transformers.utils import logging as hf_logging

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # an older layout: its bar stays
        gguf_utils = None
    was_on = hf_logging.is_progress_bar_enabled()
    orig = getattr(gguf_utils, "tqdm", None)

    def reported(iterable, *args, **kwargs):
        items = list(iterable)
        marks = {len(items) * q // 4 for q in (1, 2, 3)} - {0}
        for i, item in enumerate(items, 1):
            yield item
            if progress and i in marks:
                progress(f"dequantizing: {i}/{len(items)} tensors")

    hf_logging.disable_progress_bar()
    if orig is not None:
        gguf_utils.tqdm = reported
    try:
        yield
    finally:
        if orig is not None:
            gguf_utils.tqdm = orig
        if was_on:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _parse_once():
    """One parse of the file's metadata for the whole conversion.

    transformers' GGUF loader builds a gguf.GGUFReader, which parses every metadata field, on
    each call, and a conversion makes three (tokenizer, config, weights). On Gemma 3 270M each
    parse takes ~19 s (its 262k vocabulary strings are read one by one): 56 of the 109 s the
    conversion took on this project's 2-core machine (cProfile, transformers 5.24, gguf 0.19).
    The reader is read-only (a memory map), so the three calls can share one."""
    import gguf

    orig = gguf.GGUFReader
    made: dict = {}

    def shared_reader(path, *args, **kwargs):
        key = (os.path.realpath(os.fspath(path)), args, tuple(sorted(kwargs.items())))
        if key not in made:
            made[key] = orig(path, *args, **kwargs)
        return made[key]

    gguf.GGUFReader = shared_reader  # transformers imports it by name inside each call
    try:
        yield
    finally:
        gguf.GGUFReader = orig
        made.clear()


def ensure_converted(path: str | os.PathLike, dtype: str = "bf16",
                     progress: Optional[Callable[[str], None]] = None) -> Path:
    """The model directory for a GGUF file, dequantizing it on first use (see the module doc)."""
    p = Path(path).expanduser().resolve()
    if not is_gguf_file(p):
        raise UserError(f"{p} is not a GGUF file (it does not start with 'GGUF')",
                        hint="give a .gguf file from llama.cpp, Ollama or LM Studio, or a model directory")
    out = converted_dir(p)
    if (out / "config.json").is_file() and (out / "snugtune-gguf.json").is_file():
        return out
    meta = read_metadata(p)
    arch = str(meta.get("general.architecture") or "")
    _check_architecture(p, meta)
    _check_transformers_for(p)
    try:  # before the minutes of dequantizing, not after them
        out.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(out.parent, os.W_OK):
            raise PermissionError(13, "permission denied")
    except OSError as exc:
        from core.demo import cache_unwritable

        raise cache_unwritable(out.parent, exc) from None
    if progress:
        progress(f"dequantizing {p.name} ({arch}) into {out} (once)")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    kwargs: dict = {"gguf_file": p.name, "dtype": tdt}
    try:  # transformers >= 5.2x can keep GGUF blocks packed; training needs dense weights
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(gguf_file=p.name, dequantize=True)
    except ImportError:
        pass
    try:
        with _parse_once(), _quiet_bars(progress):
            tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
            model = AutoModelForCausalLM.from_pretrained(str(p.parent), **kwargs)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise UserError(f"{p}: transformers cannot load this GGUF file ({str(exc).splitlines()[0][:200]})",
                        hint=f"architecture {arch!r}, quantization {', '.join(meta.get('_quant', []))}: "
                        "transformers dequantizes the llama, mistral, qwen2/3, gemma/2/3, phi3 families and the "
                        "usual llama.cpp types; otherwise use the model's original Hub repository") from None
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str) and template.strip() and not getattr(tok, "chat_template", None):
        tok.chat_template = template  # transformers' GGUF tokenizer does not carry it over
    # A plain dense copy: rebuilt from the config without the GGUF quantization record, so the
    # directory loads like any checkpoint (4-bit NF4 on top of it, .half(), merging...)
    cfg = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(cfg, attr):
            try:
                delattr(cfg, attr)
            except AttributeError:
                pass
    cfg = AutoConfig.for_model(**{k: v for k, v in cfg.to_dict().items() if k != "quantization_config"})
    dense = AutoModelForCausalLM.from_config(cfg, dtype=tdt)
    missing, unexpected = dense.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if not (k.startswith("lm_head") and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise UserError(f"{p}: the dequantized weights do not match the architecture "
                        f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if getattr(dense, "generation_config", None) is not None:
        dense.generation_config.pad_token_id = tok.pad_token_id
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with _quiet_bars(None):  # transformers' "Writing model shards" bar
            dense.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "snugtune-gguf.json").write_text(json.dumps({
            "gguf": str(p), "size": p.stat().st_size, "architecture": arch, "dtype": dtype,
            "quantization": meta.get("_quant"), "name": meta.get("general.name"), "version": CONVERT_VERSION}, indent=1))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write the dequantized copy of {p.name} to {out.parent} ({exc.strerror})",
                        hint="free disk space (it needs ~2 bytes a parameter) or set SNUGTUNE_CACHE elsewhere") from None
    except BaseException:  # a stop (the engine's setup is interruptible), Ctrl-C: no half-written copy left
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---- finding GGUF files ------------------------------------------------------------------------------

@dataclass(frozen=True)
class GgufFound:
    path: Path
    label: str  # what a user recognises: the file name, or Ollama's model:tag
    where: str  # "folder" | "ollama" | "lmstudio"


def ollama_models_dir() -> Optional[Path]:
    env = os.environ.get("OLLAMA_MODELS")
    cands = [Path(env).expanduser()] if env else []
    cands += [Path.home() / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models"),
              Path("/var/lib/ollama/.ollama/models")]
    for c in cands:
        if (c / "manifests").is_dir():
            return c
    return None


def lmstudio_models_dirs() -> list[Path]:
    home = Path.home()
    cands = [home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"]
    return [c for c in cands if c.is_dir()]


def ollama_gguf_models(models_dir: Optional[Path] = None) -> list[GgufFound]:
    """model:tag -> its GGUF blob, from Ollama's manifests (manifests/<registry>/<ns>/<model>/<tag>)."""
    root = models_dir or ollama_models_dir()
    if root is None:
        return []
    out = []
    for mf in sorted((root / "manifests").rglob("*")):
        if not mf.is_file():
            continue
        try:
            doc = json.loads(mf.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for layer in doc.get("layers", []) if isinstance(doc, dict) else []:
            if layer.get("mediaType") != OLLAMA_MODEL_MEDIA:
                continue
            digest = str(layer.get("digest", "")).replace(":", "-")
            blob = root / "blobs" / digest
            if is_gguf_file(blob):
                parts = mf.relative_to(root / "manifests").parts
                ns, model, tag = (parts[-3], parts[-2], parts[-1]) if len(parts) >= 3 else ("", parts[0], "latest")
                name = model if ns in ("library", "") else f"{ns}/{model}"
                out.append(GgufFound(blob, f"{name}:{tag}", "ollama"))
    return out


def gguf_files_in(folder: Path, max_depth: int = 4) -> list[GgufFound]:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return []
    out = []
    base = len(folder.parts)
    for dirpath, dirnames, filenames in os.walk(folder):
        if len(Path(dirpath).parts) - base >= max_depth:
            dirnames[:] = []
        for f in sorted(filenames):
            if looks_like_gguf(f) and is_gguf_file(Path(dirpath) / f):
                # a split model's later shards (-00002-of-00003) are not models of their own
                if "-of-" in f and not f.split("-of-")[0].endswith("00001"):
                    continue
                out.append(GgufFound(Path(dirpath) / f, f, "folder"))
    return out


def find_gguf_models(folders: Iterable[str | os.PathLike] = (), include_apps: bool = True) -> list[GgufFound]:
    """GGUF files in the named folders, then Ollama's and LM Studio's models (when installed)."""
    seen: set = set()
    out: list[GgufFound] = []

    def add(items, where=None):
        for it in items:
            key = it.path.resolve()
            if key not in seen:
                seen.add(key)
                out.append(GgufFound(it.path, it.label, where or it.where))

    for f in folders:
        add(gguf_files_in(Path(f)))
    if include_apps:
        add(ollama_gguf_models())
        for d in lmstudio_models_dirs():
            add(gguf_files_in(d), "lmstudio")
    return out


# ---- writing a small GGUF (tests and benches: CI has no GGUF download) -------------------------------

def write_llama_gguf(model_dir: str | os.PathLike, out_path: str | os.PathLike, dtype: str = "f32") -> Path:
    """Write a Llama-architecture model directory (byte-level BPE tokenizer) as a GGUF file, the way
    llama.cpp's converter lays it out: llama.cpp's tensor names, q/k rows permuted for its RoPE
    layout (transformers' loader permutes them back), the vocabulary, merges, special ids and the
    chat template as tokenizer metadata. Uses the `gguf` package's GGUFWriter."""
    import numpy as np
    from gguf import GGUFWriter, TokenType
    from safetensors.numpy import load_file

    model_dir, out_path = Path(model_dir), Path(out_path)
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise UserError(f"write_llama_gguf writes Llama models only, not {cfg.get('model_type')!r}")
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    tc = json.loads((model_dir / "tokenizer_config.json").read_text()) if (model_dir / "tokenizer_config.json").is_file() else {}
    if tj["model"]["type"] != "BPE":
        raise UserError("write_llama_gguf needs a byte-level BPE tokenizer (tokenizer.json model BPE)")
    vocab = dict(tj["model"]["vocab"])
    for t in tj.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
    tokens = [None] * (max(vocab.values()) + 1)
    for tok, i in vocab.items():
        tokens[i] = tok
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    special = {t["content"] for t in tj.get("added_tokens", []) if t.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    H, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim") or H // heads
    npdt = {"f32": np.float32, "f16": np.float16}[dtype]

    w = GGUFWriter(str(out_path), "llama")
    w.add_name(model_dir.name)
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(H)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([TokenType.CONTROL if t in special else TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("pad_token_id", w.add_pad_token_id)):
        if cfg.get(key) is not None:
            add(int(cfg[key]))
    if tc.get("chat_template"):
        w.add_chat_template(tc["chat_template"])
    elif (model_dir / "chat_template.jinja").is_file():
        w.add_chat_template((model_dir / "chat_template.jinja").read_text())

    def permute(x, n):  # llama.cpp's q/k row order (pairs of RoPE halves interleaved)
        return x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    st = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        st.update(load_file(str(f)))
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, arr in st.items():
        arr = np.asarray(arr, dtype=np.float32)
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            if cfg.get("tie_word_embeddings"):
                continue
            gname = "output.weight"
        else:
            parts = name.split(".")  # model.layers.N.<module...>.weight
            mod = ".".join(parts[3:-1])
            gname = f"blk.{parts[2]}.{names[mod]}.{parts[-1]}"
            if mod == "self_attn.q_proj":
                arr = permute(arr, heads)
            elif mod == "self_attn.k_proj":
                arr = permute(arr, kv)
        # norms stay fp32 as llama.cpp writes them; matrices in the chosen type
        w.add_tensor(gname, arr if arr.ndim == 1 else arr.astype(npdt))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path
