"""snugtune's GGUF converter, architecture by architecture: a tiny random model of each family
snugtune trains is written as an f32 GGUF and run in llama.cpp; its logits over a prompt must
be transformers' logits (so every metadata key, tensor name and layout change is right: a
wrong RoPE order, a missing norm offset or a softcap left out changes them by far more).

f32 weights leave only the two libraries' arithmetic to differ (sums in another order), so the
comparison can be tight without depending on how close a random model's top tokens are.
"""
from __future__ import annotations

import os

import pytest

if os.environ.get("CI"):
    import llama_cpp  # noqa: F401
else:
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)


def _configs(vocab: int, tok) -> dict:
    from transformers import Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    ids = dict(vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    return {
        "llama": LlamaConfig(**SMALL, **ids, num_hidden_layers=2, rope_theta=10000.0),
        # llama3-style RoPE scaling: written as llama.cpp's rope_freqs tensor
        "llama-rope3": LlamaConfig(**SMALL, **ids, num_hidden_layers=2, rope_theta=500000.0,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        "mistral": MistralConfig(**SMALL, **ids, num_hidden_layers=2, sliding_window=None),
        "qwen2": Qwen2Config(**SMALL, **ids, num_hidden_layers=2, tie_word_embeddings=True),
        "qwen3": Qwen3Config(**SMALL, **ids, num_hidden_layers=2, head_dim=32),  # head_dim != hidden/heads
        "gemma2": Gemma2Config(**SMALL, **ids, num_hidden_layers=2, head_dim=16, query_pre_attn_scalar=16,
                               attn_logit_softcapping=1.0, final_logit_softcapping=0.5,  # small: caps that bite
                               sliding_window=128),
        # 6 layers: Gemma 3's five sliding-window layers and one global one, each with its RoPE base
        "gemma3": Gemma3TextConfig(**SMALL, **ids, num_hidden_layers=6, head_dim=16, query_pre_attn_scalar=16,
                                   sliding_window=128),
    }


@pytest.mark.parametrize("name", ["llama", "llama-rope3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_each_architecture_runs_in_llama_cpp_with_the_same_logits(name, tiny_tokenizer, tmp_path):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from core import gguf_export as ge

    cfg = _configs(len(tiny_tokenizer), tiny_tokenizer)[name]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # norms start at 1 (or 0 for Gemma's 1+w): randomise them so their handling shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.2)
    vocab = ge.read_vocab(tiny_tokenizer, cfg.vocab_size)
    path = ge.write_gguf(model.state_dict(), model.config.to_dict(), vocab, tmp_path / f"{name}.gguf", outtype="f32")

    text = "<|user|>\nWhat does zip do?</s>\n<|assistant|>\nIt pairs up items from several iterables"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    llm = ge._load_llama(llama_cpp_module(), path, n_ctx=128, n_batch=128, n_threads=2, logits_all=True,
                         verbose=False)
    try:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    scale = np.abs(want).max()
    assert np.abs(got - want).max() < 1e-3 * max(scale, 1.0), (name, np.abs(got - want).max(), scale)
    assert (got.argmax(-1) == want.argmax(-1)).all()


def llama_cpp_module():
    import llama_cpp

    return llama_cpp
