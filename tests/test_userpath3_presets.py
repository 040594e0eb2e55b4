"""Saving a preset (the wizard's ctrl+s, core.presets.save_preset) on a full disk, round 3. Before:
the temporary file the atomic write starts with stayed behind half-written, and the message had no
way out. Now it is removed, an existing preset is left as it was, and the hint says what to do."""
from __future__ import annotations

import pytest

from core.errors import UserError
from tests.conftest import fill as _fill


@pytest.fixture
def full_config_dir(small_tmpfs, monkeypatch):
    """SNUGTUNE_CONFIG_DIR on a small tmpfs (filled to the last byte by the test, after its first preset)."""
    monkeypatch.setenv("SNUGTUNE_CONFIG_DIR", str(small_tmpfs))
    return small_tmpfs


def test_a_full_disk_leaves_no_half_written_preset(full_config_dir):
    from core.presets import load_preset, save_preset, user_presets_dir

    cfg = load_preset("demo")
    first = save_preset(cfg, "mine")
    before = first.read_bytes()
    _fill(full_config_dir)
    changed = cfg.with_overrides(["lora.r=32"])
    with pytest.raises(UserError) as err:
        save_preset(changed, "mine", overwrite=True)
    assert "No space left" in str(err.value) and "free some disk space" in (err.value.hint or "")
    assert first.read_bytes() == before  # the existing preset as it was
    with pytest.raises(UserError):
        save_preset(changed, "other")
    leftovers = sorted(p.name for p in user_presets_dir().iterdir())
    assert leftovers == ["mine.toml"], leftovers
