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
    over = gpu.resolve_gpu("gtx-1650", 8)
    assert "more than the card" in over.note
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
