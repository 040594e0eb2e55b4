"""core.catalog: the built-in catalog's numbers, exact parameter counts, config.json parsing,
local directories and the HF cache layout."""
from __future__ import annotations

import json

import pytest

from core import catalog
from core.errors import UserError

ISSUE_MODELS = [
    "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-3B", "meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-3B",
    "HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-360M", "HuggingFaceTB/SmolLM2-1.7B", "google/gemma-2-2b",
    "google/gemma-3-1b-pt", "Qwen/Qwen3-0.6B-Base", "Qwen/Qwen3-1.7B-Base", "microsoft/Phi-3.5-mini-instruct",
    "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", "stabilityai/stablelm-2-1_6b",
]

# Parameter counts the Hub's safetensors metadata publishes for these models (tied embeddings
# counted once). Our counts come from the config numbers alone, so agreement checks both the
# catalog's numbers and the per-architecture layout (biases, norms, fused projections).
PUBLISHED = {
    "Qwen/Qwen2.5-0.5B": 494_032_768,
    "Qwen/Qwen2.5-1.5B": 1_543_714_304,
    "Qwen/Qwen2.5-3B": 3_085_938_688,
    "meta-llama/Llama-3.2-1B": 1_235_814_400,
    "meta-llama/Llama-3.2-3B": 3_212_749_824,
    "HuggingFaceTB/SmolLM2-135M": 134_515_008,
    "HuggingFaceTB/SmolLM2-1.7B": 1_711_376_384,
    "google/gemma-2-2b": 2_614_341_888,
    "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T": 1_100_048_384,
    "microsoft/Phi-3.5-mini-instruct": 3_821_079_552,
    "stabilityai/stablelm-2-1_6b": 1_644_515_328,
}


def test_catalog_has_the_issue_models_and_the_demo():
    ids = {s.id for s in catalog.builtin_catalog()}
    assert set(ISSUE_MODELS) <= ids
    assert "builtin:tiny-llama" in ids
    assert len(ids) >= 16


def test_six_shapes_agree_with_the_reference_probe():
    # /work/shared/reference/qlora_probe.py SHAPES (the measured BASELINE models)
    ref = {
        "Qwen/Qwen2.5-0.5B": (896, 24, 14, 2, 4864, 151936),
        "Qwen/Qwen2.5-1.5B": (1536, 28, 12, 2, 8960, 151936),
        "meta-llama/Llama-3.2-1B": (2048, 16, 32, 8, 8192, 128256),
        "HuggingFaceTB/SmolLM2-1.7B": (2048, 24, 32, 32, 8192, 49152),
        "google/gemma-2-2b": (2304, 26, 8, 4, 9216, 256000),
        "Qwen/Qwen2.5-3B": (2048, 36, 16, 2, 11008, 151936),
    }
    for mid, shape in ref.items():
        s = catalog.catalog_lookup(mid)
        assert (s.hidden_size, s.num_layers, s.num_heads, s.num_kv_heads, s.intermediate_size, s.vocab_size) == shape


def test_qwen25_05b_parameter_count_by_hand():
    s = catalog.catalog_lookup("Qwen/Qwen2.5-0.5B")
    # h=896, 14 heads x 64 = 896 for q, 2 kv heads x 64 = 128 for k and v, MLP 4864, 24 layers.
    # linear per layer: q 896*896 + k 896*128 + v 896*128 + o 896*896 + 3 * 896*4864
    per_layer = 896 * 896 + 2 * 896 * 128 + 896 * 896 + 3 * 896 * 4864
    assert per_layer == 14_909_440
    assert s.params_quantizable == 24 * per_layer == 357_826_560
    # other: embedding 151936*896 (tied head: not counted twice), 2 RMSNorms of 896 a layer + the
    # final one, and Qwen2's q/k/v biases (896 + 128 + 128 a layer)
    other = 151936 * 896 + 24 * (2 * 896) + 896 + 24 * (896 + 128 + 128)
    assert s.params_other == other == 136_206_208
    assert s.params_total == 494_032_768
    # LoRA r=16 on all seven: r x (in + out) each
    lora = 16 * ((896 + 896) + 2 * (896 + 128) + (896 + 896) + 2 * (896 + 4864) + (4864 + 896))
    assert s.lora_params(16) == 24 * lora == 8_798_208
    assert s.lora_params(16, ["q_proj", "v_proj"]) == 24 * 16 * ((896 + 896) + (896 + 128))


@pytest.mark.parametrize("mid", sorted(PUBLISHED))
def test_parameter_counts_match_the_published_ones(mid):
    assert catalog.catalog_lookup(mid).params_total == PUBLISHED[mid]


def test_demo_model_matches_core_demo():
    from core.demo import tiny_llama_config

    c = tiny_llama_config()
    s = catalog.catalog_lookup("builtin:tiny-llama")
    assert (s.hidden_size, s.num_layers, s.num_heads, s.num_kv_heads, s.intermediate_size, s.vocab_size) == (
        c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.vocab_size
    )
    assert s.tie_word_embeddings == c.tie_word_embeddings
    assert catalog.resolve_model("builtin:tiny-llama").source == "builtin"


TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=256, max_position_embeddings=128)


@pytest.mark.parametrize(
    "model_type,extra",
    [
        ("llama", {"tie_word_embeddings": False}),
        ("qwen2", {"tie_word_embeddings": True}),
        ("qwen3", {"head_dim": 32, "tie_word_embeddings": True}),
        ("gemma2", {"head_dim": 16}),
        ("gemma3_text", {"head_dim": 16}),
        ("phi3", {"tie_word_embeddings": False, "num_key_value_heads": 4, "pad_token_id": 0, "eos_token_id": 1}),
        ("stablelm", {"use_qkv_bias": True, "tie_word_embeddings": False}),
        ("mistral", {}),
    ],
)
def test_counts_match_a_real_transformers_model(model_type, extra):
    """Build the architecture for real (tiny, random) and count its parameters with torch."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **{**TINY, **extra})
    model = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in model.parameters())  # shared (tied) tensors are counted once
    in_blocks = sum(
        m.weight.numel() for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in n
    )
    spec = catalog.spec_from_config(cfg.to_dict(), f"tiny-{model_type}")
    assert spec.exact
    assert spec.params_quantizable == in_blocks
    assert spec.params_total == total
    assert spec.tie_word_embeddings == bool(cfg.tie_word_embeddings)


def test_spec_from_config_reads_nested_text_config_and_reports_missing_keys():
    nested = {"model_type": "gemma3", "text_config": {"model_type": "gemma3_text", **TINY}}
    s = catalog.spec_from_config(nested, "mm")
    assert s.hidden_size == 64 and s.norms_per_layer == 4
    with pytest.raises(UserError, match="lacks num_hidden_layers"):
        catalog.spec_from_config({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                                  "vocab_size": 10}, "broken")
    odd = catalog.spec_from_config({**TINY, "model_type": "rwkv9"}, "odd")
    assert not odd.exact and "rwkv9" in odd.note


def test_parameter_count_fallback_is_in_the_right_range():
    for n in (135e6, 500e6, 1.5e9, 3e9, 7e9):
        s = catalog.spec_from_param_count("x/y", int(n))
        assert not s.exact
        assert 0.6 < s.params_total / n < 1.6, (n, s.params_total)


def _write_cached(root, model_id, cfg):
    repo = root / ("models--" + model_id.replace("/", "--"))
    snap = repo / "snapshots" / ("b" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(cfg))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    (repo / "blobs").mkdir()
    (repo / "blobs" / "weights").write_bytes(b"\0" * 2048)


def test_local_dir_and_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    cfg = {"model_type": "llama", **TINY, "tie_word_embeddings": True}
    local = tmp_path / "my-model"
    local.mkdir()
    (local / "config.json").write_text(json.dumps(cfg))
    s = catalog.resolve_model(str(local))
    assert s.source == "local" and s.hidden_size == 64

    _write_cached(tmp_path / "hf" / "hub", "someone/cached-model", cfg)
    found = catalog.scan_cache()
    assert [x.id for x in found] == ["someone/cached-model"] and found[0].source == "cache"
    assert catalog.resolve_model("someone/cached-model", offline=True).source == "cache"

    with pytest.raises(UserError, match="no config.json"):
        catalog.spec_from_dir(tmp_path)
    with pytest.raises(UserError, match="no such model directory"):
        catalog.resolve_model("./does/not/exist")


def test_unknown_ids_suggest_catalog_matches(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        catalog.resolve_model("Qwen/Qwen2.5-1.5")
    assert "Qwen/Qwen2.5-1.5B" in str(err.value)
    with pytest.raises(UserError) as err:
        catalog.resolve_model("smollm2-1.7b")
    assert "HuggingFaceTB/SmolLM2-1.7B" in str(err.value)


def test_lora_targets_on_fused_projections():
    phi = catalog.catalog_lookup("microsoft/Phi-3.5-mini-instruct")
    names = [n for n, _, _ in phi.targeted(["q_proj", "v_proj"])]
    assert names == ["qkv_proj"]  # split names still reach Phi-3's fused layer
    assert phi.targeted(["nope"]) == []
