"""Saving a preset (the wizard's ctrl+s, core.presets.save_preset) on a full disk, round 3. Before:
the temporary file the atomic write starts with stayed behind half-written, and the message had no
way out. Now it is removed, an existing preset is left as it was, and the hint says what to do."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from core.errors import UserError


@pytest.fixture
def full_config_dir(tmp_path, monkeypatch):
    """SNUGTUNE_CONFIG_DIR on a small tmpfs with an existing preset, then filled to the last byte."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount (CI runs as root)")
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)], capture_output=True,
                         text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    try:
        monkeypatch.setenv("SNUGTUNE_CONFIG_DIR", str(where))
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill(where):
    with open(where / "filler", "ab", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
        except OSError:
            pass


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
