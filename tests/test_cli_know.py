"""`snugtune gpus`, `snugtune models`, `snugtune estimate` through tui.cli.main, offline."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from tui.cli import main


@pytest.fixture(autouse=True)
def no_hub(monkeypatch, tmp_path):
    """This machine has no internet; make that fast and explicit, with an empty HF cache."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")  # nothing listens: refused
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


def _has_gpu() -> bool:
    from core.gpu import detect_gpus

    return bool(detect_gpus())


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.skipif(_has_gpu(), reason="a GPU is present")
def test_gpus_without_driver_says_so_and_lists_profiles(capsys):
    rc, out, _ = run(capsys, "gpus")
    assert rc == 0
    assert out.startswith("No NVIDIA GPU detected:")
    assert "gtx-1650" in out and "h200" in out and "3.82 GiB" in out
    rc, out, _ = run(capsys, "gpus", "--json")
    data = json.loads(out)
    assert data["gpus"] == [] and data["nvml"] != "ok"
    assert {p["name"] for p in data["profiles"]} >= {"gtx-1650", "t4", "rtx-4090"}


def test_models_catalog_with_fit_badges(capsys):
    rc, out, _ = run(capsys, "models", "--source", "catalog", "--fits", "gtx-1650")
    assert rc == 0
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln and "/" in ln.split()[0]}
    assert lines["Qwen/Qwen2.5-0.5B"].rstrip().endswith("fits")
    # every row carries a badge; 0.5B fits a 4 GB card with room, so its badge is "fits" above
    assert all(ln.split()[-1] in ("fits", "tight", "no", "gated") for ln in lines.values())
    assert "gated" in lines["meta-llama/Llama-3.2-1B"]
    assert "Hub unreachable" not in out  # catalog only: the Hub was not asked


def test_models_json_and_search(capsys):
    rc, out, _ = run(capsys, "models", "--source", "catalog", "--search", "smollm2", "--json")
    data = json.loads(out)
    ids = [m["id"] for m in data["models"]]
    assert rc == 0 and ids and all("SmolLM2" in i for i in ids)
    m = next(m for m in data["models"] if m["id"] == "HuggingFaceTB/SmolLM2-135M")
    assert m["params_total"] == 134_515_008 and m["source"] == "catalog"


def test_models_offline_shows_catalog_and_says_hub_is_unreachable(capsys):
    rc, out, _ = run(capsys, "models", "--search", "gemma")
    assert rc == 0
    assert "google/gemma-2-2b" in out and "Hub unreachable" in out


def test_models_bad_fit_profile(capsys):
    rc, _, err = run(capsys, "models", "--source", "catalog", "--fits", "rtx-9999")
    assert rc == 2 and "unknown GPU profile" in err


def test_estimate_table(capsys):
    rc, out, _ = run(capsys, "estimate", "--model", "Qwen/Qwen2.5-1.5B", "--gpu", "gtx-1650", "--seq", "1024")
    assert rc == 0
    for label in ("weights", "LoRA adapters", "activations", "logits and loss", "CUDA context", "total (peak)", "budget"):
        assert label in out
    assert "verdict: FITS" in out
    assert "the plain recipe would need" in out and "does not fit" in out
    assert "s per optimizer step" in out


def test_estimate_json(capsys):
    rc, out, _ = run(capsys, "estimate", "--model", "google/gemma-2-2b", "--gpu", "rtx-3060-12gb", "--vram", "6",
                     "--seq", "2048", "--batch", "2", "--rank", "32", "--alpha", "64", "--dropout", "0.05",
                     "--optim", "adamw_8bit", "--json")
    assert rc == 0
    data = json.loads(out)
    assert data["budget_gib"] == 6 and data["verdict"] in ("fits", "tight", "does not fit")
    assert data["seq_len"] == 2048 and data["micro_batch"] == 2
    comps = data["components"]
    assert {"weights", "adapters", "gradients", "optimizer", "activations", "logits", "cuda_context"} <= set(comps)
    assert data["total_gib"] == pytest.approx(sum(comps.values()), abs=1e-3)
    assert data["other_recipe"]["recipe"] == "plain" and data["other_recipe"]["total_gib"] > data["total_gib"]
    assert data["model"]["vocab_size"] == 256000


def test_estimate_plain_recipe_and_no_checkpointing(capsys):
    rc, out, _ = run(capsys, "estimate", "--model", "Qwen/Qwen2.5-0.5B", "--gpu", "t4", "--recipe", "plain", "--json")
    plain = json.loads(out)
    rc2, out2, _ = run(capsys, "estimate", "--model", "Qwen/Qwen2.5-0.5B", "--gpu", "t4", "--recipe", "plain",
                       "--no-grad-ckpt", "--json")
    nogc = json.loads(out2)
    assert rc == rc2 == 0 and plain["recipe"] == "plain"
    assert nogc["components"]["activations"] > plain["components"]["activations"]


def test_estimate_autofit(capsys):
    rc, out, _ = run(capsys, "estimate", "--model", "Qwen/Qwen2.5-1.5B", "--gpu", "gtx-1650", "--recipe", "plain",
                     "--seq", "4096", "--batch", "1", "--grad-accum", "16", "--autofit", "--json")
    data = json.loads(out)
    fit = data["autofit"]
    assert rc == 0 and fit["fits"] and fit["max_seq_len"] < 4096
    assert fit["micro_batch"] * fit["grad_accum"] == 16
    assert data["seq_len"] == fit["max_seq_len"] and data["verdict"] == "fits"
    rc, out, _ = run(capsys, "estimate", "--model", "Qwen/Qwen2.5-1.5B", "--gpu", "gtx-1650", "--seq", "4096", "--autofit")
    assert rc == 0 and out.startswith("autofit: ")


def test_estimate_from_a_preset(capsys):
    rc, out, _ = run(capsys, "estimate", "--preset", "gtx-1650-qwen2.5-0.5b", "--json")
    data = json.loads(out)
    assert rc == 0 and data["model_id"].startswith("Qwen/Qwen2.5-0.5B") and data["gpu"] == "gtx-1650"


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--model", "Qwen/Qwen2.5-1.5", "--gpu", "t4"], "did you mean Qwen/Qwen2.5-1.5B"),
        (["--model", "qwen25-3b", "--gpu", "t4"], "unknown model"),
        (["--model", "Qwen/Qwen2.5-0.5B", "--gpu", "rtx-9090"], "known profiles: gtx-1650"),
        (["--model", "Qwen/Qwen2.5-0.5B", "--gpu", "t4", "--seq", "0"], "--seq must be a positive"),
        (["--model", "Qwen/Qwen2.5-0.5B", "--gpu", "t4", "--seq", "-5"], "--seq must be a positive"),
        (["--model", "Qwen/Qwen2.5-0.5B", "--gpu", "t4", "--rank", "512"], "larger than the narrowest"),
        (["--model", "Qwen/Qwen2.5-0.5B", "--gpu", "t4", "--rank", "0"], "--rank must be a positive"),
        (["--model", "Qwen/Qwen2.5-0.5B", "--gpu", "t4", "--vram", "0"], "--vram must be a positive"),
        (["--model", "Qwen/Qwen2.5-0.5B", "--gpu", "t4", "--optim", "sgd"], "train.optimizer"),
        (["--gpu", "t4"], "give --model"),
        (["--model", "someone/not-cached", "--gpu", "t4"], "unreachable"),
    ],
)
def test_estimate_bad_input_exits_2_with_one_clear_message(capsys, argv, expected):
    rc, out, err = run(capsys, "estimate", *argv)
    assert rc == 2
    assert expected in err
    assert "Traceback" not in err and out == ""


def test_know_modules_stay_light():
    """The wizard imports these in-process: no ML stack, and huggingface_hub / pynvml only on use."""
    code = (
        "import sys, json; import tui.cmd_know, core.gpu, core.catalog, core.estimate, core.hub; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    assert not loaded & {"torch", "transformers", "peft", "datasets", "bitsandbytes", "huggingface_hub", "pynvml"}
