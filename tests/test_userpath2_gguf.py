"""A GGUF file as the model, the way users' files go wrong: a download cut short in its weights
(the usual kind), one cut inside its header, and an architecture transformers cannot dequantize.
Each is one message naming the file, what is wrong and what to do, from every command (exit 2),
where before `data inspect` printed a struct.error traceback and train blamed the architecture
for a cut file ("cannot reshape array of size 123688 ...")."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gguf")

from core import gguf_source  # noqa: E402
from core.catalog import resolve_model  # noqa: E402
from core.errors import UserError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo_gguf(tmp_path_factory) -> Path:
    from core.demo import ensure_tiny_llama

    return gguf_source.write_llama_gguf(ensure_tiny_llama(), tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def cut(src: Path, dst: Path, n: int) -> Path:
    dst.write_bytes(src.read_bytes()[:n])
    return dst


def test_a_whole_gguf_passes_the_size_check(demo_gguf):
    assert resolve_model(str(demo_gguf)).source == "gguf"


def test_a_gguf_cut_short_in_its_weights_is_said_with_the_bytes_missing(demo_gguf, tmp_path):
    short = cut(demo_gguf, tmp_path / "short.gguf", demo_gguf.stat().st_size - 1_000_000)
    for call in (lambda: resolve_model(str(short)), lambda: gguf_source.load_tokenizer(short),
                 lambda: gguf_source.ensure_converted(short)):
        with pytest.raises(UserError, match=r"short\.gguf: the file is cut short: .* \(1\.0 MiB missing\)") as err:
            call()
        assert "fetch the file again" in str(err.value)


def test_a_gguf_cut_in_its_header_is_said_by_the_tokenizer_path_too(demo_gguf, tmp_path):
    head = cut(demo_gguf, tmp_path / "head.gguf", 3000)
    with pytest.raises(UserError, match=r"head\.gguf: not a readable GGUF file \(the file ends inside its header\)"):
        gguf_source.load_tokenizer(head)  # `data inspect --model`: was struct.error, exit 1


def test_an_architecture_transformers_cannot_dequantize_is_named_before_loading(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "rwkv.gguf"
    w = GGUFWriter(str(path), "rwkv6")
    w.add_block_count(2)
    w.add_embedding_length(64)
    w.add_tensor("token_embd.weight", np.zeros((100, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for call in (lambda: gguf_source.load_tokenizer(path), lambda: gguf_source.ensure_converted(path)):
        with pytest.raises(UserError, match=r"architecture 'rwkv6', which transformers .* cannot dequantize "
                           r"\(it reads .*llama.*\)") as err:
            call()
        assert "original weights" in str(err.value)


def test_the_cli_says_a_cut_gguf_once_and_exits_2(demo_gguf, tmp_path):
    short = cut(demo_gguf, tmp_path / "short.gguf", demo_gguf.stat().st_size // 2)
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n', encoding="utf-8")
    for args in (["estimate", "--model", str(short), "--gpu", "gtx-1650"],
                 ["data", "inspect", "--path", str(data), "--model", str(short)]):
        out = subprocess.run([sys.executable, "-m", "tui.cli", *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 2, out.stderr
        assert "the file is cut short" in out.stderr and "Traceback" not in out.stderr
