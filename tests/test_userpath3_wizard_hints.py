"""Hints inside the wizard in the wizard's words (round 3, item 4). Before, the wizard showed the
command line's syntax where its own fields are what the user acts on: `data.max_seq_len = 2048
(Settings step)` for the field labelled "Sequence len", `--set data.path=...` from the pre-run
check (which ran in the CLI's syntax), `train.epochs=60` for the Epochs field."""
from __future__ import annotations

import json

from core.data import hint_syntax, setting_hint


def test_data_settings_are_named_by_the_wizards_fields():
    with hint_syntax("wizard"):
        assert setting_hint("max_seq_len", 2048) == "Sequence len: 2048 (Settings step)"
        assert setting_hint("template", "builtin") == "Template: builtin (Settings step, Advanced)"
        assert setting_hint("format", "text") == "Format: text (Data step)"
        # no field for it in the wizard: where it can be set instead, not a flag it has no box for
        split = setting_hint("text_split", "line")
        assert split.startswith('data.text_split = "line" under [data] in a preset') and "--text-split" not in split
    # the command line keeps its own syntax
    assert setting_hint("max_seq_len", 2048).startswith("--set data.max_seq_len=2048")
    with hint_syntax("inspect"):
        assert setting_hint("max_seq_len", 2048) == "--seq 2048"


def test_the_pre_run_check_speaks_the_wizards_words_when_it_asks(tmp_path, capsys):
    from core.config import RunConfig
    from core.preflight import main

    cfg = RunConfig.from_dict({"model": {"name_or_path": "builtin:tiny-llama"},
                               "data": {"path": "REPLACE_WITH_YOUR_DATA.jsonl"}})
    path = cfg.write_toml(tmp_path / "config.toml")
    assert main([str(path), "--hint-syntax", "wizard"]) == 2
    wizard = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "Data step" in wizard["hint"] and "--set" not in wizard["hint"]
    assert main([str(path)]) == 2
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "--set data.path=" in cli["hint"]


def test_the_wizards_few_steps_note_names_its_fields():
    from core.plan import few_steps_note

    note = few_steps_note(2, 2, None, wizard=True)
    assert "Epochs 30 gives 60" in note and "Grad accum" in note and "train." not in note
    assert "train.epochs=30 gives 60" in few_steps_note(2, 2, None)


def test_a_sample_the_template_cannot_render_gets_the_wizards_template_field(tmp_path, tiny_tokenizer):
    import copy

    from core.config import DataConfig
    from core.data import inspect
    from core.errors import UserError

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{{ raise_exception('system messages are not supported') }}"
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    try:
        inspect(DataConfig(path=str(path)), tok, syntax="wizard")
    except UserError as exc:
        assert exc.hint and "Template: builtin (Settings step, Advanced)" in exc.hint
    else:
        raise AssertionError("the template's failure was not said")
