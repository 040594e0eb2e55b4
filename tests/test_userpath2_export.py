"""Export, round 2: `--gguf` and `--ollama` together converted and quantized the model twice
(minutes and a second copy on disk for an 8B model); an Ollama folder whose template cannot be
written was refused only after the GGUF beside it had been written."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("gguf")

from test_export_gguf import _write_run  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    data = d / "qa.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n" for i in range(4)),
                    encoding="utf-8")
    return _write_run(tmp_path_factory.mktemp("run"), model_dir="builtin:tiny-llama", data_path=data)


def test_gguf_and_ollama_together_convert_once(run, tmp_path):
    from core.export import export

    said: list[str] = []
    export(run, gguf=str(tmp_path / "m.gguf"), ollama=str(tmp_path / "oll"), quant="f16",
           out=said.append, progress=said.append)
    gguf, in_ollama = tmp_path / "m.gguf", tmp_path / "oll" / "model.gguf"
    assert in_ollama.read_bytes() == gguf.read_bytes()
    assert in_ollama.stat().st_ino == gguf.stat().st_ino  # one file on disk (same filesystem: a hard link)
    conversions = [s for s in said if "38/38" in s or s.startswith("writing GGUF")]
    assert sum("38/38" in s for s in conversions) == 1, said
    assert (tmp_path / "oll" / "Modelfile").read_text().startswith("# written by snugtune")


def test_an_ollama_template_that_cannot_be_written_is_refused_before_any_gguf(run, tmp_path, monkeypatch):
    from core import export as ex
    from core.errors import UserError

    import dataclasses

    # the rare template whose Ollama form cannot be derived, forced on the demo's
    real = ex.trained_template
    monkeypatch.setattr(ex, "trained_template", lambda m: dataclasses.replace(real(m), go=None))
    with pytest.raises(UserError, match="cannot be written as an Ollama TEMPLATE"):
        ex.export(run, gguf=str(tmp_path / "m.gguf"), ollama=str(tmp_path / "oll"), quant="f16",
                  out=lambda s: None, progress=lambda s: None)
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "oll").exists()


def test_an_output_folder_that_cannot_be_written_is_said_before_the_merge(run):
    # A read-only mount or a folder without write permission: was an OSError traceback from
    # mkstemp at the very end, after the merge (exit 1). sysfs refuses to create files even for
    # root, who passes every permission check: it stands in for a read-only folder here.
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    try:
        fd, name = tempfile.mkstemp(dir="/sys")
    except OSError:
        pass
    else:
        import os

        os.close(fd)
        os.unlink(name)
        pytest.skip("this machine lets /sys be written")
    root = Path(__file__).resolve().parent.parent
    for flag, dest in (("--merged", "/sys/snugtune-merged"), ("--gguf", "/sys/snugtune.gguf")):
        out = subprocess.run([sys.executable, "-m", "tui.cli", "export", str(run), flag, dest, "--quant", "f16"],
                             cwd=root, capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, out.stderr
        assert "cannot write in /sys" in out.stderr and "Traceback" not in out.stderr
        assert "merging" not in out.stderr  # refused before anything heavy loaded
