"""core.gpu: NVML detection (this machine has no NVIDIA driver: the real no-driver path runs),
the profiles, and resolve_gpu's budgets."""
from __future__ import annotations

import pytest

from core import gpu
from core.errors import UserError

REQUIRED = ["gtx-1650", "gtx-1660-super", "rtx-2060", "rtx-3050", "rtx-3060-12gb", "rtx-4060", "rtx-4060-ti-16gb",
            "rtx-3090", "rtx-4090", "t4", "l4", "a10g", "a100-40gb", "h100", "h200"]


def _has_nvml_gpu() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        n = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
        return n > 0
    except Exception:
        return False


@pytest.mark.skipif(_has_nvml_gpu(), reason="this machine has an NVIDIA GPU; the no-driver path cannot run")
def test_no_driver_gives_empty_list_and_a_reason():
    assert gpu.detect_gpus() == []
    reason = gpu.nvml_status()
    assert reason != "ok" and ("driver" in reason or "NVML" in reason or "nvidia-ml-py" in reason)
    assert gpu.live_stats(0) == {"used_gib": None, "total_gib": None, "util_pct": None, "temp_c": None, "power_w": None}


@pytest.mark.skipif(_has_nvml_gpu(), reason="this machine has an NVIDIA GPU")
def test_auto_without_gpu_plans_for_the_cpu_and_says_why():
    t = gpu.resolve_gpu("auto")
    assert t.is_cpu and not t.detected
    assert "no NVIDIA GPU detected" in t.note and "--gpu PROFILE" in t.note
    assert t.budget_gib > 0  # available RAM


def test_profiles_cover_the_cards_people_own():
    assert set(REQUIRED) <= set(gpu.PROFILES)
    for p in gpu.PROFILES.values():
        # bf16 tensor cores arrived with Ampere (compute capability 8.0)
        assert p.bf16 == (p.compute_capability >= (8, 0)), p.name
        assert 3 < p.memory_gib < 150 and p.fp16_tflops > 0 and p.bandwidth_gbs > 0
        assert 0.3 <= p.cuda_context_gib <= 0.6
    # a "4 GB" card reports 3.82 GiB: the profile holds what the driver reports, not the box's GB
    assert gpu.PROFILES["gtx-1650"].memory_gib < 4.0 < gpu.PROFILES["gtx-1660-super"].memory_gib


def test_profile_budget_and_vram_override():
    t = gpu.resolve_gpu("gtx-1650")
    assert t.name == "gtx-1650" and t.budget_gib == pytest.approx(3.82) and t.budget_source == "profile"
    assert not t.bf16 and t.compute_capability == (7, 5)
    capped = gpu.resolve_gpu("rtx-3090", 3.5)
    assert capped.budget_gib == 3.5 and capped.budget_source == "vram" and capped.total_gib == pytest.approx(23.69)
    with pytest.raises(UserError, match="more than"):  # the budget is at most the card's memory (issue 9)
        gpu.resolve_gpu("gtx-1650", 8)
    assert gpu.resolve_gpu("RTX-4090").name == "rtx-4090"  # case does not matter


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(UserError) as err:
        gpu.resolve_gpu("rtx-3080")
    text = str(err.value)
    assert "unknown GPU profile 'rtx-3080'" in text and "gtx-1650" in text and "h200" in text
    assert "did you mean" in text
    with pytest.raises(UserError):
        gpu.resolve_gpu("t4", -1)


def test_cpu_target():
    t = gpu.resolve_gpu("cpu")
    assert t.is_cpu and t.cuda_context_gib == 0 and t.budget_source == "ram"


def test_nvml_names_map_to_profiles():
    assert gpu.profile_for("NVIDIA GeForce GTX 1650", 3.82).name == "gtx-1650"
    assert gpu.profile_for("NVIDIA GeForce RTX 3060", 11.76).name == "rtx-3060-12gb"
    assert gpu.profile_for("NVIDIA GeForce RTX 4060 Ti", 15.7).name == "rtx-4060-ti-16gb"
    assert gpu.profile_for("Tesla T4", 14.75).name == "t4"
    assert gpu.profile_for("NVIDIA H200", 139.8).name == "h200"
    assert gpu.profile_for("NVIDIA GeForce GTX 1660 SUPER", 5.79).name == "gtx-1660-super"
    assert gpu.profile_for("Matrox G200", 0.1) is None


class _FakeNvml:
    """Stands in for NVML only because no NVIDIA driver exists on this machine (the real no-driver
    path is tested above); it answers like nvidia-ml-py 12 for a GTX 1650 with a desktop on it."""

    class NVMLError(Exception):
        pass

    NVML_TEMPERATURE_GPU = 0

    class _Mem:
        total, used, free = int(3.82 * 2**30), int(0.45 * 2**30), int(3.37 * 2**30)

    class _Proc:
        def __init__(self, pid, used):
            self.pid, self.usedGpuMemory = pid, used

    class _Util:
        gpu = 37

    def __init__(self):
        self.inits = 0

    def nvmlInit(self):
        self.inits += 1

    def nvmlShutdown(self):
        pass

    def nvmlSystemGetDriverVersion(self):
        return "550.54"

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        if i != 0:
            raise self.NVMLError("Invalid Argument")
        return "h0"

    def nvmlDeviceGetMemoryInfo(self, h):
        return self._Mem()

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return (7, 5)

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA GeForce GTX 1650"

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return []

    def nvmlDeviceGetGraphicsRunningProcesses(self, h):
        return [self._Proc(1234, int(0.3 * 2**30)), self._Proc(99, None)]  # None: not visible in a container

    def nvmlSystemGetProcessName(self, pid):
        return {1234: "/usr/lib/xorg/Xorg -core", 99: "firefox"}[pid]

    def nvmlDeviceGetUtilizationRates(self, h):
        return self._Util()

    def nvmlDeviceGetTemperature(self, h, kind):
        return 61

    def nvmlDeviceGetPowerUsage(self, h):
        return 42_500  # milliwatts

    NVMLError.__module__ = "pynvml"


def test_detected_card_is_read_and_planned_for(monkeypatch):
    import sys

    fake = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    (g,) = gpu.detect_gpus()
    assert gpu.nvml_status() == "ok"
    assert g.name == "NVIDIA GeForce GTX 1650" and g.compute_capability == (7, 5) and not g.bf16
    assert g.total_gib == pytest.approx(3.82) and g.free_gib == pytest.approx(3.37) and g.driver == "550.54"
    assert g.processes[0] == (1234, "Xorg", pytest.approx(0.3)) and g.processes[1][:2] == (99, "firefox")
    t = gpu.resolve_gpu("auto")
    assert t.detected and t.name == "gtx-1650" and t.budget_source == "free"
    assert t.budget_gib == pytest.approx(3.37)  # the free memory, not the total: the desktop keeps its share
    assert "already in use" in t.note
    assert gpu.resolve_gpu("auto", 3.0).budget_gib == 3.0
    with pytest.raises(UserError, match="device_index"):
        gpu.resolve_gpu("auto", None, 1)
    stats = gpu.live_stats(0)
    assert stats == {"used_gib": pytest.approx(0.45), "total_gib": pytest.approx(3.82), "util_pct": 37.0,
                     "temp_c": 61.0, "power_w": 42.5}
