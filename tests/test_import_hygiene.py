"""The engine never imports the UI; the UI never imports the ML stack (it must start fast).

Each module is imported in a fresh interpreter, and sys.modules is inspected afterwards.
"""
import json
import subprocess
import sys

import pytest

HEAVY = ["torch", "transformers", "peft", "bitsandbytes", "datasets", "accelerate"]

# Modules the wizard imports in-process: none may pull in the ML stack.
LIGHT_MODULES = [
    "tui.cli",
    "tui.app",
    "core.config",
    "core.errors",
    "core.presets",
    "core.events",
    "core.runs",
    "core.gpu",
    "core.catalog",
    "core.estimate",
]
CORE_MODULES = [
    "core.config", "core.presets", "core.events", "core.runs", "core.gpu", "core.catalog",
    "core.estimate", "core.data", "core.model", "core.train", "core.savers", "core.demo",
]


def _loaded_after_import(module: str) -> set[str]:
    code = f"import importlib, json, sys; importlib.import_module({module!r}); print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.fail(f"importing {module} failed:\n{out.stderr}")
    return {name.split(".")[0] for name in json.loads(out.stdout.strip().splitlines()[-1])}


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_light_modules_do_not_import_the_ml_stack(module):
    loaded = _loaded_after_import(module)
    assert not (loaded & set(HEAVY)), f"{module} pulled in {sorted(loaded & set(HEAVY))}"


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_never_imports_textual(module):
    loaded = _loaded_after_import(module)
    assert "textual" not in loaded, f"{module} pulled in textual"
