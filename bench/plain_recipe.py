"""The plain recipe, exactly as measured in shared/reference/qlora_probe.py and maxctx.py.

Copied here because the GPU machine receives only this repository. Same settings: NF4 with
double quantization, bf16 compute, peft's prepare_model_for_kbit_training (fp32 upcast of the
non-quantized weights), LoRA r=16 alpha 32 dropout 0 on all seven projections, HF gradient
checkpointing (non-reentrant), paged 8-bit AdamW, the model's own loss, no autocast.
"""
from __future__ import annotations

import gc
import os

# Real architecture numbers of the six models (shared/reference/qlora_probe.py).
SHAPES = {
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                         max_position_embeddings=32768),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True,
                         max_position_embeddings=32768),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072, head_dim=64),
    "smollm2-1.7b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, intermediate_size=8192, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192),
    "gemma-2-2b": dict(model_type="gemma2", hidden_size=2304, num_hidden_layers=26, num_attention_heads=8,
                       num_key_value_heads=4, intermediate_size=9216, vocab_size=256000, tie_word_embeddings=True,
                       head_dim=256, max_position_embeddings=8192),
    "qwen2.5-3b": dict(model_type="qwen2", hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True,
                       max_position_embeddings=32768),
    # CPU smoke test of the bench itself (not a measurement)
    "tiny": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, vocab_size=512, tie_word_embeddings=True,
                 max_position_embeddings=4096),
}

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(name, root, device):
    """Random-init model from the real config, saved once in bf16 (memory and speed do not depend on values)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.path.join(root, name)
    if not os.path.exists(os.path.join(path, "config.json")):
        kw = dict(SHAPES[name])
        mt = kw.pop("model_type")
        cfg = AutoConfig.for_model(mt, **kw)
        torch.manual_seed(0)
        with torch.device(device):
            m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        m.save_pretrained(path)
        del m
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return path


def quant_config():
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def load_plain(path, device):
    """The reference's model: 4-bit load, peft prepare (fp32 upcast, HF checkpointing), LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant_config(), dtype=torch.bfloat16,
                                             device_map={"": 0 if device == "cuda" else "cpu"})
    m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=True,
                                        gradient_checkpointing_kwargs={"use_reentrant": False})
    m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                     target_modules=TARGETS))
    m.train()
    return m
