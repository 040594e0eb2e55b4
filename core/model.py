"""The model: find it (built-in, local directory or Hub id), load it in 4-bit NF4, attach LoRA.

QLoRA as the paper and the plain recipe do it: NF4 weights with double quantization
(bitsandbytes), 16-bit compute, LoRA adapters (peft) on every linear projection, gradient
checkpointing (non-reentrant). The same path runs on the CPU: bitsandbytes 0.50 quantizes and
trains 4-bit layers there, which is what the tests use. Memory savers from core.savers come last.
"""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from core.config import RunConfig
from core.errors import UserError

# A Hub repo id is `name` or `owner/name`; anything that looks like a filesystem path is local.
_PATH_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")


def is_builtin(name: str) -> bool:
    try:
        from core.demo import is_builtin as demo_is_builtin
    except ImportError:
        return name.startswith("builtin:")
    return demo_is_builtin(name)


def resolve_model_source(name_or_path: str, revision: Optional[str] = None, weights: bool = True) -> str:
    """A local directory or a Hub id that from_pretrained will find; a clear UserError otherwise.

    For a Hub id this fetches config.json first (from the cache when offline), so that a missing,
    gated or unreachable model is reported in one sentence before anything heavy starts. A GGUF
    file becomes its dequantized model directory; with weights=False (a tokenizer is all the caller
    needs) the file itself is returned until it has been converted, and load_tokenizer reads it.
    """
    if is_builtin(name_or_path):
        from core.demo import resolve_builtin

        return str(resolve_builtin(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_file() or name_or_path.lower().endswith(".gguf"):
        from core import gguf_source

        if not path.is_file():
            raise UserError(f"model.name_or_path = {name_or_path!r}: no such GGUF file",
                            hint="check the path of the .gguf file (or give a model directory or Hub id)")
        if not weights:
            done = gguf_source.converted_dir(path)
            if not gguf_source.is_gguf_file(path):
                raise UserError(f"{path} is not a GGUF file (it does not start with 'GGUF')",
                                hint="give a .gguf file, a model directory or a Hub id")
            return str(done) if (done / "snugtune-gguf.json").is_file() else str(path.resolve())
        # a GGUF file is dequantized once into a cached 16-bit model directory, which then loads
        # (in NF4 for QLoRA) like any local model; its tokenizer and chat template come from the file
        return str(gguf_source.ensure_converted(path, progress=lambda m: print(f"snugtune: {m}", file=sys.stderr)))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"model directory {path} has no config.json",
                hint="point model.name_or_path at a directory saved with save_pretrained (config.json + weights)",
            )
        return str(path)
    if name_or_path.startswith(_PATH_PREFIXES) or path.exists() or name_or_path.count("/") > 1:
        raise UserError(
            f"model directory {name_or_path!r} not found",
            hint="give an existing local model directory or a Hub id such as 'Qwen/Qwen2.5-0.5B-Instruct'",
        )
    _check_hub_model(name_or_path, revision)
    return name_or_path


def _check_hub_model(repo_id: str, revision: Optional[str]) -> None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hf_errors

    where = f"model.name_or_path = {repo_id!r}"
    from core.hub import HubUnreachable, check_reachable

    try:
        # A quick TCP probe first: offline, the client retries for ~30 s before giving up, and the
        # model may well be in the local cache, which needs no network at all.
        check_reachable()
    except HubUnreachable:
        try:
            hf_hub_download(repo_id, "config.json", revision=revision, local_files_only=True)
            return
        except Exception:  # noqa: BLE001 - not cached: say the Hub is unreachable, below
            raise UserError(
                f"{where}: the Hugging Face Hub cannot be reached and the model is not in the local cache",
                hint="connect to the network (or check HF_ENDPOINT / proxy settings), or give a local model directory",
            ) from None
    try:
        hf_hub_download(repo_id, "config.json", revision=revision)
    except hf_errors.HFValidationError:
        raise UserError(
            f"{where}: not a valid Hub model id and not an existing directory",
            hint="a Hub id looks like 'owner/name'; a local model is a directory holding config.json",
        ) from None
    except hf_errors.GatedRepoError:
        # Never echo the token: only say where a token comes from.
        raise UserError(
            f"{where}: this model is gated and needs an access token",
            hint=f"accept its license at https://huggingface.co/{repo_id}, then log in with `hf auth login` "
            "or set the HF_TOKEN environment variable",
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise UserError(
            f"{where}: no such model on the Hub (or it is private and needs a token)",
            hint="check the spelling (e.g. 'Qwen/Qwen2.5-0.5B-Instruct'); for a private model set HF_TOKEN",
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise UserError(f"{where}: revision {revision!r} not found",
                        hint="model.revision takes a branch, tag or commit of the repository") from None
    except hf_errors.RemoteEntryNotFoundError:
        raise UserError(f"{where}: the repository has no config.json, so it is not a transformers model") from None
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled):
        raise UserError(
            f"{where}: the Hugging Face Hub cannot be reached and the model is not in the local cache",
            hint="connect to the network (or check HF_ENDPOINT / proxy settings), or give a local model directory",
        ) from None
    except hf_errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        raise UserError(f"{where}: the Hub answered with an error (HTTP {status})",
                        hint="try again later, or give a local model directory") from None
    except OSError as exc:  # connection failures surface as OSError subclasses
        raise UserError(
            f"{where}: the Hugging Face Hub cannot be reached ({type(exc).__name__})",
            hint="connect to the network (or check HF_ENDPOINT / proxy settings), or give a local model directory",
        ) from None


# ---- device and precision -------------------------------------------------------------------


def select_device(cfg: RunConfig) -> dict[str, Any]:
    """Where the run trains: a dict with type ('cuda'/'cpu'), index, name, total_gib, budget_gib, bf16."""
    profile = cfg.gpu.profile
    if profile != "cpu" and torch.cuda.is_available():
        index = cfg.gpu.device_index
        if index >= torch.cuda.device_count():
            raise UserError(
                f"gpu.device_index = {index}, but this machine has {torch.cuda.device_count()} CUDA device(s)",
                hint="device indices start at 0; see `nvidia-smi`",
            )
        props = torch.cuda.get_device_properties(index)
        return {
            "type": "cuda",
            "index": index,
            "name": props.name,
            "total_gib": round(props.total_memory / 2**30, 2),
            "budget_gib": cfg.gpu.vram_budget_gib,
            "capability": f"{props.major}.{props.minor}",
            # bf16 arithmetic is native from Ampere (compute capability 8.0) on; older cards
            # (GTX 16xx, RTX 20xx, T4) only emulate it, slowly, so they get fp16.
            "bf16": props.major >= 8,
        }
    if profile not in ("auto", "cpu"):
        raise UserError(
            f"gpu.profile = {profile!r} plans for a GPU, but no CUDA GPU is available here",
            hint="train on the CPU with --set gpu.profile=cpu (slow; fine for tiny models), or use a machine with a GPU",
        )
    total = None
    try:
        total = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 2)
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "type": "cpu",
        "index": None,
        "name": platform.processor() or platform.machine() or "cpu",
        "total_gib": total,
        "budget_gib": None,
        "threads": torch.get_num_threads(),
        "bf16": False,
    }


def pick_compute_dtype(setting: str, device: dict) -> str:
    """'bf16', 'fp16' or 'fp32' for model.compute_dtype on this device.

    'auto': bf16 on Ampere and newer, fp16 on older GPUs, fp32 on the CPU (bitsandbytes' CPU
    4-bit kernels train correctly in both bf16 and fp32, but CPUs without AMX emulate bf16
    matmuls slowly, and fp32 is exact).
    """
    from core.plan import compute_dtype  # the rule lives in the plan

    return compute_dtype(setting, device["type"] == "cuda", bool(device.get("bf16")))[0]


TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---- loading ---------------------------------------------------------------------------------


def load_tokenizer(source: str, cfg: RunConfig):
    from transformers import AutoTokenizer

    from core import gguf_source

    if Path(source).is_file() and gguf_source.is_gguf_file(source):
        tok = gguf_source.load_tokenizer(source)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
        return tok
    try:
        tok = AutoTokenizer.from_pretrained(
            source, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise _remote_code_error(cfg) from None
        raise
    if tok.pad_token is None:
        # Causal LMs often ship without a pad token; padding positions are masked out of the loss
        # anyway, so reusing EOS (or UNK) is safe.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def _remote_code_error(cfg: RunConfig) -> UserError:
    return UserError(
        f"model {cfg.model.name_or_path!r} ships its own Python code, which snugtune does not run by default",
        hint="if you trust its author, pass --set model.trust_remote_code=true",
    )


def quantization_config(compute: str):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",  # NF4: the 4-bit type matched to normally distributed weights
        bnb_4bit_use_double_quant=True,  # quantize the quantization constants too: ~0.4 bit/param saved
        bnb_4bit_compute_dtype=TORCH_DTYPES[compute],
    )


# On the CPU, unquantized LoRA needs the weights in fp32 (4 bytes a parameter) plus the run's
# working set; take it when that stays under this share of the RAM available now.
CPU_UNQUANTIZED_RAM_SHARE = 0.5
# ... and only for models big enough to be bound by their matmuls. Measured on a shared 2-core
# machine (bench/results/cpu_lora_*.json, CPU seconds per 1,000 trained tokens): Gemma 3 270M
# 166 unquantized vs 192 in 4-bit (unquantized 14% cheaper); the 3.5M demo model 9.9 vs 7.4
# (4-bit's fused NF4+LoRA path 25% cheaper: tiny layers are bound by per-call overhead).
CPU_UNQUANTIZED_MIN_PARAMS = 100_000_000


def _available_ram_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _param_count(source: str) -> Optional[int]:
    """Parameters of a local model directory, from its config (torch-free), else None."""
    try:
        from core.catalog import spec_from_dir

        return spec_from_dir(Path(source)).params_total
    except Exception:  # noqa: BLE001 - a Hub id or an unusual config: no estimate, 4-bit stays
        return None


def use_4bit(cfg: RunConfig, device: dict, source: Optional[str] = None) -> tuple[bool, str]:
    """(quantize, why): model.load_in_4bit, with 'auto' decided for this device.

    'auto' is NF4 on a GPU (QLoRA: what makes models fit). On the CPU, bitsandbytes' 4-bit path
    dequantizes every weight on every matmul, which costs more than it saves for real models
    where RAM is plentiful, so the CPU trains them unquantized (fp32 weights) when 4 bytes a
    parameter stay under half the available RAM; tiny models keep 4-bit (see the constants)."""
    v = cfg.model.load_in_4bit
    if isinstance(v, bool):
        return v, f"model.load_in_4bit = {str(v).lower()}"
    if device.get("type") == "cuda":
        return True, "auto: 4-bit NF4 on the GPU (QLoRA)"
    n = _param_count(source) if source else None
    avail = _available_ram_bytes()
    if n is None or avail is None:
        return True, "auto: 4-bit (the model's size or the free RAM is unknown)"
    need = n * 4
    if n < CPU_UNQUANTIZED_MIN_PARAMS:
        return True, (f"auto: 4-bit on the CPU (a {n / 1e6:.0f}M-parameter model trains faster through the fused "
                      "4-bit path than unquantized)")
    if need <= CPU_UNQUANTIZED_RAM_SHARE * avail:
        return False, (f"auto: unquantized LoRA on the CPU (faster there than 4-bit; weights "
                       f"{need / 2**30:.1f} GiB of {avail / 2**30:.1f} GiB free)")
    return True, (f"auto: 4-bit on the CPU (unquantized weights would take {need / 2**30:.1f} GiB "
                  f"of {avail / 2**30:.1f} GiB free)")


def load_base_model(source: str, cfg: RunConfig, device: dict, *, quantize: Optional[bool] = None,
                    compute: Optional[str] = None):
    """The base model on the device: 4-bit NF4 when use_4bit() says so (or `quantize`), else 16-bit."""
    from transformers import AutoModelForCausalLM

    compute = compute or pick_compute_dtype(cfg.model.compute_dtype, device)
    quantize = use_4bit(cfg, device, source)[0] if quantize is None else quantize
    kwargs: dict[str, Any] = {
        "revision": cfg.model.revision,
        "trust_remote_code": cfg.model.trust_remote_code,
        "dtype": TORCH_DTYPES[compute],
        "device_map": {"": device["index"] if device["type"] == "cuda" else "cpu"},
    }
    attn = cfg.model.attn_implementation
    kwargs["attn_implementation"] = "sdpa" if attn == "auto" else attn
    if quantize:
        kwargs["quantization_config"] = quantization_config(compute)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except ValueError as exc:
        msg = str(exc)
        if "trust_remote_code" in msg:
            raise _remote_code_error(cfg) from None
        if "attn_implementation" in msg or "does not support" in msg and "attention" in msg.lower():
            raise UserError(f"model.attn_implementation = {attn!r} is not available for this model or machine: {msg}",
                            hint="use 'auto' (PyTorch SDPA) or 'eager'") from None
        raise
    return model


def checkpointing_enable(model) -> None:
    """transformers' activation checkpointing, non-reentrant (works with frozen inputs; the variant
    PyTorch recommends). transformers 5.2x renamed gradient_checkpointing_* to activation_checkpointing_*
    and warns on every call of the old names (a FutureWarning in every engine.log); older 5.x has only
    the old ones."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def checkpointing_disable(model) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    elif hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()


def is_checkpointing(model) -> bool:
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    return bool(getattr(model, name, False))


def _enable_gradient_checkpointing(model) -> None:
    checkpointing_enable(model)
    # With frozen embeddings the first checkpointed block would see inputs without grad.
    model.enable_input_require_grads()


def prepare_for_training(model, cfg: RunConfig, quantized: Optional[bool] = None) -> None:
    """k-bit preparation (the savers' 16-bit-keeping version when present) and checkpointing."""
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    if quantized is None:
        quantized = count_4bit_layers(model) > 0
    if quantized:
        from core import savers

        if hasattr(savers, "prepare_for_kbit_training"):
            savers.prepare_for_kbit_training(model, bool(cfg.train.gradient_checkpointing))
        else:
            from peft import prepare_model_for_kbit_training

            prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=cfg.train.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
    if cfg.train.gradient_checkpointing and not is_checkpointing(model):
        _enable_gradient_checkpointing(model)
    elif cfg.train.gradient_checkpointing:
        model.enable_input_require_grads()


def lora_config(cfg: RunConfig):
    from peft import LoraConfig

    target = cfg.lora.target_modules
    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        # "all-linear": peft puts adapters on every nn.Linear / Linear4bit except the output head.
        target_modules="all-linear" if target == "all-linear" else list(target),
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(model, cfg: RunConfig):
    import warnings

    from peft import get_peft_model

    try:
        with warnings.catch_warnings():
            # peft reads transformers' old `is_gradient_checkpointing` name, which 5.2x deprecates with a
            # FutureWarning in every engine.log; nothing a user can act on
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, lora_config(cfg))
    except ValueError as exc:
        if "Target modules" in str(exc) or "not found in the base model" in str(exc):
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise UserError(
                f"lora.target_modules = {cfg.lora.target_modules!r}: none of these layers exist in this model",
                hint=f"its linear layers are named: {', '.join(names)}; or use 'all-linear'",
            ) from None
        raise


def load_for_training(cfg: RunConfig, device: dict, source: Optional[str] = None, plan=None):
    """(model with LoRA attached, tokenizer, info dict) ready for the Trainer, set up as `plan`
    (core.plan.Plan) decides; without one, the plan for this config on this device."""
    source = source or resolve_model_source(cfg.model.name_or_path, cfg.model.revision)
    if plan is None:
        from core import plan as plan_mod
        from core.train import source_spec

        plan = plan_mod.plan(cfg, source_spec(source, cfg.model.revision), plan_mod.target_for_device(cfg, device))
    tokenizer = load_tokenizer(source, cfg)
    compute = plan.compute_dtype
    quantize, quantize_why = use_4bit(cfg, device, source)
    model = load_base_model(source, cfg, device, compute=compute, quantize=quantize)
    prepare_for_training(model, cfg, quantized=quantize)
    model = attach_lora(model, cfg)
    from core import fp16guard, savers

    applied = savers.install_savers(model, plan) or {}
    # after the savers: install_savers begins by undoing every `_snug_orig` patch, this one too
    guard, guard_why = plan.fp16_guard, plan.fp16_guard_why
    if guard:
        # with core/kernels.py installed (it leaves the norms to the guard) the guard's norms are fused too
        fused = str(applied.get("kernels", "")).startswith("triton:")
        applied.update(fp16guard.install(model, TORCH_DTYPES[compute], kernels=fused))
    trainable, total = model.get_nb_trainable_parameters()
    info = {
        "source": source,
        "compute_dtype": compute,
        "load_in_4bit": quantize,
        "load_in_4bit_why": quantize_why,
        "fp16_guard": guard,
        "fp16_guard_why": guard_why,
        "trainable_params": int(trainable),
        "total_params": int(total),
        "linear4bit_layers": count_4bit_layers(model),
        "savers": applied,
    }
    return model, tokenizer, info


def count_4bit_layers(model) -> int:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    return sum(1 for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
