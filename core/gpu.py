"""GPUs: what is in this machine (NVML), and built-in profiles of the cards people own and rent.

No torch here: the wizard calls this in-process and must open fast. NVML comes from the
`nvidia-ml-py` distribution (module `pynvml`), imported lazily inside the functions, so a
machine with no driver still imports this module and gets an empty list plus a reason
(`nvml_status()`).
"""
from __future__ import annotations

import difflib
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

from core.errors import UserError

GIB = 2**30


@dataclass(frozen=True)
class GpuInfo:
    """One card as NVML reports it now."""

    index: int
    name: str
    total_gib: float
    used_gib: float
    free_gib: float
    compute_capability: tuple[int, int]
    bf16: bool
    driver: str
    # Processes holding memory on the card: (pid, name, used GiB). A desktop, a browser, a game.
    processes: list[tuple[int, str, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GpuProfile:
    """A card model: memory, features and throughput, for planning without the card at hand."""

    name: str
    label: str
    memory_gib: float  # what the driver reports as total (cudaGetDeviceProperties), not the box's "GB"
    compute_capability: tuple[int, int]
    bf16: bool
    fp16_tflops: float  # dense fp16 tensor throughput with fp32 accumulation (what PyTorch matmuls use)
    bandwidth_gbs: float  # memory bandwidth, GB/s
    # Memory the process spends outside PyTorch's allocator: CUDA context, cuBLAS/cuDNN kernels
    # loaded lazily (CUDA >= 11.7), NCCL-free. ~0.3-0.4 GiB on consumer cards (BASELINE.md caps
    # the allocator at 4 - 0.35 GiB for this reason); larger on data-centre parts whose
    # context carries more kernels and a bigger cuBLAS workspace.
    cuda_context_gib: float = 0.35

    def to_dict(self) -> dict:
        return asdict(self)


def _p(name, label, mem, cc, bf16, tflops, bw, ctx=0.35) -> GpuProfile:
    return GpuProfile(name, label, mem, cc, bf16, tflops, bw, ctx)


# Memory totals are what PyTorch/NVML report for the card ("N GiB total capacity" in an OOM
# message), which is a little under the box's GB: a "4 GB" GTX 1650 reports 3.82 GiB.
# Throughput: dense fp16 with fp32 accumulate from the vendor's whitepapers (GeForce cards
# run fp32-accumulate at half the fp16-accumulate rate on Turing/Ampere/Ada); GTX 16xx have no
# tensor cores, so their number is the plain fp16 shader rate. Rough on purpose: they feed
# "time per epoch" estimates, which are rough anyway.
PROFILES: dict[str, GpuProfile] = {
    p.name: p
    for p in [
        _p("gtx-1650", "GeForce GTX 1650 4 GB", 3.82, (7, 5), False, 6.0, 128),
        _p("gtx-1660-super", "GeForce GTX 1660 SUPER 6 GB", 5.79, (7, 5), False, 10.0, 336),
        _p("rtx-2060", "GeForce RTX 2060 6 GB", 5.79, (7, 5), False, 26.0, 336),
        _p("rtx-3050", "GeForce RTX 3050 8 GB", 7.79, (8, 6), True, 18.0, 224),
        _p("rtx-3060-12gb", "GeForce RTX 3060 12 GB", 11.76, (8, 6), True, 25.0, 360),
        _p("rtx-4060", "GeForce RTX 4060 8 GB", 7.75, (8, 9), True, 30.0, 272),
        _p("rtx-4060-ti-16gb", "GeForce RTX 4060 Ti 16 GB", 15.7, (8, 9), True, 44.0, 288),
        _p("rtx-3090", "GeForce RTX 3090 24 GB", 23.69, (8, 6), True, 71.0, 936, 0.40),
        _p("rtx-4090", "GeForce RTX 4090 24 GB", 23.65, (8, 9), True, 82.6, 1008, 0.40),
        _p("t4", "Tesla T4 16 GB", 14.75, (7, 5), False, 65.0, 320, 0.40),
        _p("l4", "L4 24 GB", 22.05, (8, 9), True, 121.0, 300, 0.45),
        _p("a10g", "A10G 24 GB", 22.06, (8, 6), True, 70.0, 600, 0.45),
        _p("a100-40gb", "A100 40 GB", 39.39, (8, 0), True, 312.0, 1555, 0.50),
        _p("h100", "H100 80 GB (SXM)", 79.11, (9, 0), True, 989.0, 3350, 0.55),
        _p("h200", "H200 141 GB", 139.81, (9, 0), True, 989.0, 4800, 0.55),
    ]
}

# For a detected card no profile matches: throughput guessed from the architecture generation.
_GENERIC_BY_CC = {(7, 5): (30.0, 320), (8, 0): (312.0, 1555), (8, 6): (35.0, 450), (8, 9): (60.0, 400), (9, 0): (989.0, 3350)}


@dataclass(frozen=True)
class GpuTarget:
    """The device a plan or a run is for: a detected card, a profile, or the CPU."""

    name: str
    label: str
    budget_gib: float  # what the card gives this process, CUDA context included (nvidia-smi's view)
    bf16: bool
    compute_capability: Optional[tuple[int, int]]
    fp16_tflops: float
    bandwidth_gbs: float
    is_cpu: bool = False
    detected: bool = False
    total_gib: float = 0.0
    cuda_context_gib: float = 0.35
    budget_source: str = "profile"  # "vram" (user's cap), "free" (detected free memory), "profile", "ram"
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


_NVML_REASON: Optional[str] = None


def nvml_status() -> str:
    """Why detect_gpus() found nothing, or 'ok'."""
    if _NVML_REASON is None:
        detect_gpus()
    return _NVML_REASON or "ok"


def _nvml():
    """Import and initialise NVML; raise RuntimeError with a plain reason when impossible."""
    try:
        import pynvml  # noqa: PLC0415  (lazy: absent or driver-less machines must still import us)
    except ImportError:
        raise RuntimeError("the nvidia-ml-py package (module pynvml) is not installed") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:  # LibraryNotFound, DriverNotLoaded, NoPermission...
        text = str(exc) or type(exc).__name__
        if "LibraryNotFound" in type(exc).__name__ or "not found" in text.lower():
            raise RuntimeError("no NVIDIA driver found (NVML library libnvidia-ml.so is missing)") from None
        if "DriverNotLoaded" in type(exc).__name__ or "driver not loaded" in text.lower():
            raise RuntimeError("the NVIDIA driver is not loaded") from None
        raise RuntimeError(f"NVML could not start: {text}") from None
    return pynvml


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def detect_gpus() -> list[GpuInfo]:
    """The NVIDIA GPUs in this machine; [] (and a reason in nvml_status()) when there are none."""
    global _NVML_REASON
    try:
        nv = _nvml()
    except RuntimeError as exc:
        _NVML_REASON = str(exc)
        return []
    try:
        driver = _text(nv.nvmlSystemGetDriverVersion())
        count = nv.nvmlDeviceGetCount()
        gpus = []
        for i in range(count):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            try:
                cc = tuple(nv.nvmlDeviceGetCudaComputeCapability(h))
            except nv.NVMLError:
                cc = (0, 0)
            gpus.append(
                GpuInfo(
                    index=i,
                    name=_text(nv.nvmlDeviceGetName(h)),
                    total_gib=mem.total / GIB,
                    used_gib=mem.used / GIB,
                    free_gib=mem.free / GIB,
                    compute_capability=cc,
                    bf16=cc >= (8, 0),  # bf16 tensor cores arrived with Ampere (sm_80)
                    driver=driver,
                    processes=_processes(nv, h),
                )
            )
        _NVML_REASON = "ok" if gpus else "the NVIDIA driver is loaded but reports no GPU"
        return gpus
    except nv.NVMLError as exc:
        _NVML_REASON = f"NVML failed while reading the cards: {exc}"
        return []
    finally:
        try:
            nv.nvmlShutdown()
        except Exception:
            pass


def _processes(nv, handle) -> list[tuple[int, str, float]]:
    seen: dict[int, tuple[int, str, float]] = {}
    for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        try:
            procs = getattr(nv, getter)(handle)
        except (nv.NVMLError, AttributeError):
            continue
        for p in procs:
            used = (p.usedGpuMemory or 0) / GIB  # None inside containers without PID namespace access
            try:
                name = _text(nv.nvmlSystemGetProcessName(p.pid))
            except nv.NVMLError:
                name = "?"
            name = os.path.basename(name.split(" ")[0]) or name
            prev = seen.get(p.pid)
            seen[p.pid] = (p.pid, name, max(used, prev[2] if prev else 0.0))
    return sorted(seen.values(), key=lambda t: -t[2])


def live_stats(index: int = 0) -> dict:
    """Now: used/total GiB, utilisation %, temperature C, power W (None where not readable)."""
    out = {"used_gib": None, "total_gib": None, "util_pct": None, "temp_c": None, "power_w": None}
    try:
        nv = _nvml()
    except RuntimeError:
        return out
    try:
        h = nv.nvmlDeviceGetHandleByIndex(index)
        readers = {
            "mem": lambda: nv.nvmlDeviceGetMemoryInfo(h),
            "util_pct": lambda: float(nv.nvmlDeviceGetUtilizationRates(h).gpu),
            "temp_c": lambda: float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
            "power_w": lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0,  # NVML reports milliwatts
        }
        for key, read in readers.items():
            try:
                value = read()
            except nv.NVMLError:
                continue
            if key == "mem":
                out["used_gib"], out["total_gib"] = value.used / GIB, value.total / GIB
            else:
                out[key] = value
    except nv.NVMLError:
        pass
    finally:
        try:
            nv.nvmlShutdown()
        except Exception:
            pass
    return out


def profile_for(name: str, total_gib: float | None = None) -> Optional[GpuProfile]:
    """The profile that matches an NVML device name ('NVIDIA GeForce RTX 3060'), if any."""
    key = name.lower().replace("nvidia", "").replace("geforce", "").replace("tesla", "").strip()
    key = "-".join(key.replace("super", " super").split())
    best, best_score = None, 0.0
    for p in PROFILES.values():
        stem = p.name.rsplit("-", 1)[0] if p.name.endswith("gb") else p.name
        if key == stem or key.startswith(stem + "-") or key == p.name:
            score = 1.0
        else:
            score = difflib.SequenceMatcher(None, key, stem).ratio()
            if score < 0.85:
                continue
        if total_gib is not None:
            score -= abs(p.memory_gib - total_gib) / max(total_gib, 1.0)  # 3060 8 GB vs 12 GB, etc.
        if score > best_score:
            best, best_score = p, score
    return best


def _system_ram_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):
        return 8.0


def _available_ram_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return _system_ram_gib()


def cpu_target(note: str = "") -> GpuTarget:
    return GpuTarget(
        name="cpu",
        label="CPU (no GPU)",
        budget_gib=_available_ram_gib(),
        bf16=False,
        compute_capability=None,
        fp16_tflops=0.5,  # a few cores of fp32 AVX2 matmul: ~0.1-1 TFLOPS
        bandwidth_gbs=30.0,
        is_cpu=True,
        total_gib=_system_ram_gib(),
        cuda_context_gib=0.0,
        budget_source="ram",
        note=note,
    )


def unknown_profile_error(profile: str) -> UserError:
    close = difflib.get_close_matches(profile.lower(), list(PROFILES), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return UserError(
        f"unknown GPU profile {profile!r}; known profiles: {', '.join(PROFILES)}, or 'auto', 'cpu'",
        hint=f"{hint}see `snugtune gpus --profiles`; add --vram GIB to cap any profile's memory",
    )


def resolve_gpu(profile: str = "auto", vram_budget_gib: float | None = None, device_index: int = 0) -> GpuTarget:
    """Turn the config's gpu.profile ('auto', 'cpu' or a profile name) into a target with a budget.

    Budget: `vram_budget_gib` if set, else the detected card's free memory, else the profile's memory.
    'auto' with no usable GPU gives the CPU target with a note saying why (never an exception), so
    the wizard and `snugtune estimate` can show the reason and suggest a profile.
    """
    if vram_budget_gib is not None and vram_budget_gib <= 0:
        raise UserError(f"--vram must be a positive number of GiB, got {vram_budget_gib}")
    key = (profile or "auto").strip().lower()
    if key == "cpu":
        t = cpu_target()
        return _with_budget(t, vram_budget_gib)
    if key == "auto":
        gpus = detect_gpus()
        if not gpus:
            return _with_budget(
                cpu_target(
                    note=f"no NVIDIA GPU detected ({nvml_status()}); planning for the CPU. "
                    "Pick a card with --gpu PROFILE (see `snugtune gpus --profiles`)."
                ),
                vram_budget_gib,
            )
        if device_index >= len(gpus):
            raise UserError(
                f"gpu.device_index is {device_index} but this machine has {len(gpus)} GPU(s) (0..{len(gpus) - 1})"
            )
        g = gpus[device_index]
        prof = profile_for(g.name, g.total_gib)
        tflops, bw = (prof.fp16_tflops, prof.bandwidth_gbs) if prof else _GENERIC_BY_CC.get(g.compute_capability, (20.0, 300))
        t = GpuTarget(
            name=prof.name if prof else g.name,
            label=g.name,
            budget_gib=g.free_gib,
            bf16=g.bf16,
            compute_capability=g.compute_capability,
            fp16_tflops=tflops,
            bandwidth_gbs=bw,
            detected=True,
            total_gib=g.total_gib,
            cuda_context_gib=prof.cuda_context_gib if prof else 0.4,
            budget_source="free",
            note=f"{g.used_gib:.2f} GiB already in use by other processes" if g.used_gib > 0.05 else "",
        )
        return _with_budget(t, vram_budget_gib)
    prof = PROFILES.get(key)
    if prof is None:
        raise unknown_profile_error(profile)
    t = GpuTarget(
        name=prof.name,
        label=prof.label,
        budget_gib=prof.memory_gib,
        bf16=prof.bf16,
        compute_capability=prof.compute_capability,
        fp16_tflops=prof.fp16_tflops,
        bandwidth_gbs=prof.bandwidth_gbs,
        total_gib=prof.memory_gib,
        cuda_context_gib=prof.cuda_context_gib,
        budget_source="profile",
    )
    return _with_budget(t, vram_budget_gib)


def _with_budget(t: GpuTarget, vram: float | None) -> GpuTarget:
    if vram is None:
        return t
    from dataclasses import replace

    if t.total_gib and vram > t.total_gib + 1e-6 and not t.is_cpu:
        # one meaning of the budget: what the card gives this process, CUDA context included
        raise UserError(
            f"memory budget {vram:g} GiB is more than {t.label}'s {t.total_gib:.2f} GiB",
            hint="the budget is what the card gives this run, CUDA context included: at most the card's memory "
            "(leave it unset for the whole card)",
        )
    return replace(t, budget_gib=float(vram), budget_source="vram")
