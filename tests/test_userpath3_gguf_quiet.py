"""GGUF loading without progress bars (round 3, item 7). Before, dequantizing a GGUF printed
transformers' tqdm bar ("Converting and de-quantizing GGUF tensors...", redrawn tens of times with
carriage returns) and its "Loading weights" bar into `snugtune train`'s terminal (the pre-run check
converts in-process), the wizard's pre-run check output and engine.log, whose last line the wizard
shows when something fails. Now the conversion says its progress in snugtune's own lines, and the
engine and the wizard's pre-run check run with the bars off."""
from __future__ import annotations

import shutil

import pytest

from core import gguf_source, runs


@pytest.fixture(scope="module")
def demo_gguf(tmp_path_factory):
    from core.demo import ensure_tiny_llama

    return gguf_source.write_llama_gguf(ensure_tiny_llama(), tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_a_conversion_prints_no_progress_bar_and_says_its_own_progress(demo_gguf, tmp_path, capfd):
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bar = gguf_utils.tqdm
    bars_on = hf_logging.is_progress_bar_enabled()  # (another test in this process may have turned them off)
    said: list[str] = []
    copy = shutil.copy(demo_gguf, tmp_path / "fresh.gguf")  # not converted yet
    capfd.readouterr()
    out = gguf_source.ensure_converted(copy, progress=said.append)
    err = capfd.readouterr().err
    assert (out / "config.json").is_file()
    assert "it/s" not in err and "\r" not in err and "Converting and de-quantizing" not in err, err[-500:]
    assert said[0].startswith("dequantizing fresh.gguf") and said[-1].startswith("dequantizing: ")
    assert any("/" in s and s.endswith("tensors") for s in said[1:])
    # transformers is left as it was found
    assert gguf_utils.tqdm is bar and hf_logging.is_progress_bar_enabled() == bars_on


def test_the_engine_and_the_wizards_pre_run_check_run_without_bars():
    import subprocess
    import sys

    # what the engine's and the pre-run check's processes get: a bar drawn there prints nothing
    code = ("from tqdm.auto import tqdm; list(tqdm(range(3), desc='bar'));"
            "from transformers.utils import logging; print(logging.is_progress_bar_enabled())")
    proc = subprocess.run([sys.executable, "-c", code], env=runs.quiet_env(dict(__import__("os").environ)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "bar" not in proc.stderr and proc.stdout.strip() == "False"
    # a user's own choice stands
    assert runs.quiet_env({"TQDM_DISABLE": "0"})["TQDM_DISABLE"] == "0"


def test_the_wizards_pre_run_check_leaves_dequantizing_to_the_engine(demo_gguf, tmp_path, tiny_instruction_jsonl):
    # before: the wizard's pre-run check (600 s limit) dequantized the GGUF itself; a 7-8B one takes
    # minutes and writes ~16 GB, so the check timed out, its half-written copy was thrown away, and
    # every ctrl+t began again
    from core.config import RunConfig
    from core.preflight import check

    copy = shutil.copy(demo_gguf, tmp_path / "fresh.gguf")
    cfg = RunConfig.from_dict({"gpu": {"profile": "cpu"}, "model": {"name_or_path": str(copy)},
                               "data": {"path": str(tiny_instruction_jsonl), "max_seq_len": 64},
                               "output": {"runs_dir": str(tmp_path / "runs")}})
    info = check(cfg, convert_gguf=False)
    assert info["samples"] == 64 and info["disk_needed_mb"] is not None  # the shape read from the header
    assert not gguf_source.converted_dir(copy).exists()


def test_the_wizards_subprocesses_draw_no_bars_either():
    # the export's log was read back line by line for the status line: "exporting: Loading weights:
    # 74%|███▎ | 174/236 [...]" while a real model loaded
    import subprocess
    import sys

    from tui.screens.base import subprocess_env

    code = "from tqdm.auto import tqdm; list(tqdm(range(3), desc='bar'))"
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "bar" not in proc.stderr
