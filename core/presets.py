"""Presets: run configurations a person can read and diff, each headed by the command that runs it.

Built-in presets ship as package data in `presets/*.toml`; user presets live in
platformdirs' user_config_dir("snugtune")/presets (`SNUGTUNE_CONFIG_DIR` overrides the config
directory). Saving under a built-in's name is refused: the README's `snugtune --preset demo`
must always mean the shipped demo. (A file put there by hand still shadows it; listings say so.)
No torch here: the wizard imports it.
"""
from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

from core.config import RunConfig
from core.errors import UserError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,80}$")


@dataclass(frozen=True)
class PresetInfo:
    name: str
    source: str  # "builtin" or "user"
    path: Path
    description: str

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "path": str(self.path), "description": self.description}


def config_dir() -> Path:
    env = os.environ.get("SNUGTUNE_CONFIG_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_config_dir

    return Path(user_config_dir("snugtune"))


def user_presets_dir() -> Path:
    return config_dir() / "presets"


def builtin_presets_dir() -> Path:
    return Path(str(resources.files("presets")))


def _description(path: Path) -> str:
    # Read the `description = "..."` line without validating the whole file: a listing must not
    # fail because one user preset is broken (loading it says what is wrong).
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return ""
    m = re.search(r'^description\s*=\s*"((?:[^"\\]|\\.)*)"', text, re.MULTILINE)
    return m.group(1) if m else ""


def _scan(directory: Path, source: str) -> dict[str, PresetInfo]:
    found: dict[str, PresetInfo] = {}
    if directory.is_dir():
        for path in sorted(directory.glob("*.toml")):
            found[path.stem] = PresetInfo(path.stem, source, path, _description(path))
    return found


def list_presets() -> list[PresetInfo]:
    """Built-in presets first, then user presets; a user preset shadows a built-in of its name."""
    merged = _scan(builtin_presets_dir(), "builtin")
    merged.update(_scan(user_presets_dir(), "user"))
    builtin = [p for p in merged.values() if p.source == "builtin"]
    user = [p for p in merged.values() if p.source == "user"]
    return builtin + user


def find_preset(name_or_path: str) -> Path:
    """The file of a preset name, or the path itself if it names a TOML file."""
    candidate = Path(name_or_path).expanduser()
    looks_like_path = name_or_path.endswith(".toml") or os.sep in name_or_path
    if looks_like_path:
        if candidate.is_file():
            return candidate
        raise UserError(
            f"preset file {name_or_path!r} not found",
            hint="give the path of an existing .toml file, or a preset name (see `snugtune presets`)",
        )
    for info in reversed(list_presets()):  # user presets win
        if info.name == name_or_path:
            return info.path
    import difflib

    names = [p.name for p in list_presets()]
    known = ", ".join(names) or "(none)"
    near = difflib.get_close_matches(name_or_path, names, n=1, cutoff=0.6)
    raise UserError(
        f"unknown preset {name_or_path!r}" + (f" (did you mean {near[0]!r}?)" if near else "") + f"; known presets: {known}",
        hint="or give the path of a TOML file; `snugtune presets` lists them with descriptions",
    )


def load_preset(name_or_path: str) -> RunConfig:
    """A preset as a validated RunConfig; errors name the file and the key."""
    return RunConfig.from_toml(find_preset(name_or_path))


def preset_text(name_or_path: str) -> str:
    return find_preset(name_or_path).read_text(encoding="utf-8")


def save_preset(cfg: RunConfig, name: str, overwrite: bool = False, header: Optional[str] = None) -> Path:
    """Save a configuration as a user preset; refuses to overwrite an existing one unless asked."""
    if not _NAME_RE.match(name):
        raise UserError(
            f"invalid preset name {name!r}",
            hint="use letters, digits, '.', '_' and '-' (starting with a letter or digit)",
        )
    builtin = _scan(builtin_presets_dir(), "builtin")
    if name in builtin:
        raise UserError(
            f"{name!r} is the name of a built-in preset ({builtin[name].description or builtin[name].path.name})",
            hint=f"choose another name, e.g. {name}-mine; the built-in stays as shipped",
        )
    directory = user_presets_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the presets directory {directory} ({exc.strerror})",
                        hint="set SNUGTUNE_CONFIG_DIR to a writable directory") from None
    path = directory / f"{name}.toml"
    if path.exists() and not overwrite:
        raise UserError(f"a user preset named {name!r} already exists ({path})",
                        hint="choose another name, or overwrite it explicitly")
    header = header or f"Run it with: snugtune train {name}"
    try:
        return cfg.write_toml(path, header=header, overwrite=overwrite)
    except OSError as exc:
        # write_toml writes a temporary file beside the preset and renames it: one cut short by a
        # full disk is removed (an existing preset was never touched)
        path.with_name(f".{path.name}.tmp").unlink(missing_ok=True)
        full = exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG)
        raise UserError(f"cannot write {path} ({exc.strerror})",
                        hint="free some disk space and save again" if full else
                        "set SNUGTUNE_CONFIG_DIR to a writable directory") from None
