"""Presets: the built-in ones are valid and runnable, user presets are saved safely."""
import pytest

from core import presets
from core.config import ConfigError, RunConfig
from core.errors import UserError

BUILTIN = ["demo", "gtx-1650-qwen2.5-0.5b", "rtx-3060-qwen2.5-1.5b", "rtx-4090-qwen2.5-3b"]


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_presets_validate_and_are_headed_by_their_command(name):
    cfg = presets.load_preset(name)
    assert isinstance(cfg, RunConfig) and cfg.description
    first = presets.preset_text(name).splitlines()[0]
    assert first.startswith("# Run it with: snugtune train " + name)


def test_gpu_presets_name_known_gpu_profiles_and_need_the_users_data():
    from core.gpu import PROFILES

    for name in BUILTIN[1:]:
        cfg = presets.load_preset(name)
        assert cfg.gpu.profile in PROFILES
        assert cfg.data.path.startswith("REPLACE")


def test_demo_preset_is_offline_and_short():
    cfg = presets.load_preset("demo")
    assert cfg.model.name_or_path.startswith("builtin:") and cfg.data.path.startswith("builtin:")
    assert cfg.train.max_steps and cfg.train.max_steps <= 100


def test_listing_has_builtins_then_user_presets_and_a_user_preset_shadows_a_builtin(config_dir):
    cfg = presets.load_preset("demo").with_overrides(["train.max_steps=3", "description='my quick demo'"])
    presets.save_preset(cfg, "mine")
    # saving under a built-in's name is refused (issue 14); a file put there by hand still shadows it
    with pytest.raises(UserError, match="built-in preset"):
        presets.save_preset(cfg, "demo")
    assert not (presets.user_presets_dir() / "demo.toml").exists()
    cfg.write_toml(presets.user_presets_dir() / "demo.toml")
    listed = presets.list_presets()
    by_name = {p.name: p for p in listed}
    assert by_name["mine"].source == "user" and by_name["mine"].description == "my quick demo"
    assert by_name["demo"].source == "user"
    assert presets.load_preset("demo").train.max_steps == 3
    assert [p.source for p in listed] == sorted((p.source for p in listed), key=["builtin", "user"].index)


def test_save_preset_refuses_to_overwrite_unless_asked(config_dir):
    cfg = presets.load_preset("demo")
    path = presets.save_preset(cfg, "keep")
    assert path.read_text().startswith("# Run it with: snugtune train keep")
    with pytest.raises(UserError, match="already exists"):
        presets.save_preset(cfg.with_overrides(["lora.r=4"]), "keep")
    assert presets.load_preset("keep").lora.r == cfg.lora.r
    presets.save_preset(cfg.with_overrides(["lora.r=4"]), "keep", overwrite=True)
    assert presets.load_preset("keep").lora.r == 4


def test_bad_preset_names_are_refused(config_dir):
    with pytest.raises(UserError, match="invalid preset name"):
        presets.save_preset(presets.load_preset("demo"), "../escape")
    assert not config_dir.exists() or not list(config_dir.rglob("*.toml"))


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(UserError) as exc:
        presets.load_preset("no-such-preset")
    assert "no-such-preset" in str(exc.value)
    for name in BUILTIN:
        assert name in str(exc.value)


def test_a_preset_path_loads_and_a_bad_value_names_file_and_key(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[model]\nname_or_path = "m"\n[data]\npath = "d.jsonl"\n')
    assert presets.load_preset(str(good)).model.name_or_path == "m"
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nname_or_path = "m"\n[data]\npath = "d.jsonl"\n[lora]\nr = 0\n')
    with pytest.raises(ConfigError) as exc:
        presets.load_preset(str(bad))
    assert exc.value.key == "lora.r" and str(bad) in str(exc.value)
    with pytest.raises(UserError, match="not found"):
        presets.load_preset(str(tmp_path / "missing.toml"))
