"""The `snugtune train ...` line that runs the setup on screen: a preset plus `--set` overrides.

`snugtune train` needs a preset (cmd_runs.cmd_train), and `--set` can change a key but not
remove one. So the base is the preset the wizard started from when it can express the setup,
else the built-in preset that needs the fewest overrides; a setup no preset can express (a key
to remove from every one) is saved as a preset first, and the line names that.
"""
from __future__ import annotations

import json
import shlex
from typing import Any

# Not training settings: a description differing from the base's changes nothing a run does.
IGNORED = {"description", "version"}


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and key != "columns":
            out.update(flatten(value, dotted + "."))
        elif value is not None:
            out[dotted] = value
    return out


def toml_value(value: Any, top: bool = True) -> str:
    """A value as `--set` parses it (TOML: quoted strings, true/false, numbers, arrays, tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v, False)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v, False) for v in value) + "]"
    text = str(value)
    from core.config import parse_value

    # bare where --set reads it back as this same string (gtx-1650, Qwen/Qwen2.5-0.5B): easier to
    # read and edit; quoted where it would parse as something else (true, 12, a list)
    if top and text and not any(c.isspace() or c in "'\"\\#=" for c in text) and parse_value(text) == text:
        return text
    return json.dumps(text)  # a TOML basic string


def overrides(base: dict, current: dict) -> list[str] | None:
    """The `--set` assignments turning `base` into `current`, or None when a key would have to be
    removed (not expressible with --set)."""
    b, c = flatten(base), flatten(current)
    if any(k not in c and k.split(".")[0] not in IGNORED for k in b):
        return None
    return [f"{k}={toml_value(v)}" for k, v in c.items() if k.split(".")[0] not in IGNORED and b.get(k) != v]


def train_command(current: dict, preset_name: str | None) -> tuple[str, str | None]:
    """(the command line, a note or None). `current` is RunConfig.to_dict() of the setup."""
    from core import presets

    candidates: list[str] = []
    if preset_name:
        candidates.append(preset_name)
    candidates += [p.name for p in presets.list_presets() if p.name not in candidates]
    best: tuple[str, list[str]] | None = None
    for name in candidates:
        try:
            base = presets.load_preset(name).to_dict()
        except Exception:  # noqa: BLE001 - a broken user preset is just not a base
            continue
        sets = overrides(base, current)
        if sets is None:
            continue
        if name == preset_name or best is None or len(sets) < len(best[1]):
            best = (name, sets)
            if name == preset_name:
                break
    if best is None:
        return ("snugtune train NAME   # after saving this setup as preset NAME (ctrl+s)",
                "no preset can say this setup with --set (a setting would have to be removed): save it first")
    name, sets = best
    line = "snugtune train " + shlex.quote(name) + "".join(f" --set {shlex.quote(s)}" for s in sets)
    note = None if name == preset_name else f"based on the built-in preset {name!r}, the closest to this setup"
    return line, note
