"""The run configuration: validation messages name the file, the key and what is allowed."""
import pytest

from core.config import ConfigError, RunConfig, field_help, sections

BASE = '[model]\nname_or_path = "m"\n[data]\npath = "d.jsonl"\n'


def _load(text, tmp_path):
    p = tmp_path / "run.toml"
    p.write_text(text)
    return RunConfig.from_toml(p), p


def test_minimal_config_gets_documented_defaults(tmp_path):
    cfg, _ = _load(BASE, tmp_path)
    assert cfg.model.load_in_4bit and cfg.lora.target_modules == "all-linear"
    assert cfg.train.micro_batch * cfg.train.grad_accum >= 1
    assert cfg.model.trust_remote_code is False


def test_toml_round_trip_keeps_every_value(tmp_path):
    cfg, _ = _load(BASE + '[lora]\nr = 8\ntarget_modules = ["q_proj", "v_proj"]\n[train]\nmax_steps = 7\n', tmp_path)
    again = RunConfig.from_toml_text(cfg.to_toml(header="a header"))
    assert again == cfg and again.lora.target_modules == ["q_proj", "v_proj"]


def test_unknown_key_names_file_key_and_a_close_match(tmp_path):
    with pytest.raises(ConfigError) as exc:
        _load(BASE + "[train]\nlearning_rat = 0.1\n", tmp_path)
    msg = str(exc.value)
    assert "run.toml" in msg and "train.learning_rat" in msg and "learning_rate" in msg


def test_wrong_type_and_out_of_range_values_are_explained(tmp_path):
    with pytest.raises(ConfigError) as exc:
        _load(BASE + '[train]\nmicro_batch = "four"\n', tmp_path)
    assert exc.value.key == "train.micro_batch"
    with pytest.raises(ConfigError) as exc:
        _load(BASE.replace('path = "d.jsonl"', 'path = "d.jsonl"\neval_fraction = 0.95'), tmp_path)
    assert exc.value.key == "data.eval_fraction" and "0.9" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        _load(BASE + '[train]\noptimizer = "sgd"\n', tmp_path)
    assert "paged_adamw_8bit" in str(exc.value)


def test_missing_required_section_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="model"):
        _load('[data]\npath = "d.jsonl"\n', tmp_path)


def test_invalid_toml_is_reported_with_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        _load("[model\n", tmp_path)


def test_set_overrides_parse_toml_values_and_validate():
    cfg = RunConfig.from_toml_text(BASE)
    new = cfg.with_overrides(["train.max_steps=4", "lora.target_modules=['q_proj']", "data.path=other.jsonl"])
    assert new.train.max_steps == 4 and new.lora.target_modules == ["q_proj"] and new.data.path == "other.jsonl"
    assert cfg.train.max_steps is None  # frozen: the original is untouched
    with pytest.raises(ConfigError, match="lora.r"):
        cfg.with_overrides(["lora.r=-1"])
    with pytest.raises(ConfigError, match="key=value"):
        cfg.with_overrides(["lora.r"])


def test_every_field_has_help_text():
    for section, model in sections().items():
        for name in model.model_fields:
            assert field_help(f"{section}.{name}").strip(), f"{section}.{name} has no description"
