"""Tiny random Hugging Face models, made and saved at test time as references."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TINY_FAMILIES = ("llama", "qwen2", "qwen3")
HYBRID_FAMILIES = ("qwen3_5", "qwen3_next", "qwen3_moe", "qwen3_5_moe")
# Llama derivatives (tests/test_llama_derivatives.py) and Nemotron-H (tests/test_nemotron_h.py).
LLAMA_DERIVATIVES = ("mistral", "phi3", "glm4")
NEMOTRON_FAMILIES = ("nemotron_h",)

# Mistral / Phi-3 with a sliding window shorter than the test prompts, so it masks.
_WINDOW = dict(sliding_window=6)
# Nemotron-H: Mamba2 (16 heads of 8 channels in 8 groups, so 8 devices hold a group each;
# state 16; chunks of 8 tokens, so prompts span several chunks), attention without rotary,
# relu2 MLP.
_NEMOTRON = dict(hybrid_override_pattern="M*M-", mamba_num_heads=16, mamba_head_dim=8, n_groups=8,
                 ssm_state_size=16, chunk_size=8, conv_kernel=4, head_dim=16, num_key_value_heads=2)

_LINEAR = dict(linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=16,
               linear_value_head_dim=16, linear_conv_kernel_dim=4, head_dim=16,
               layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
               num_hidden_layers=4)
_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)

_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
               num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
               rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def tiny_config(family: str, **overrides):
    import transformers

    kw = {**_COMMON, **overrides}
    if family == "llama":
        return transformers.LlamaConfig(rope_theta=10000.0, **kw)
    if family == "qwen2":
        if "tie_word_embeddings" not in overrides:  # the qwen2 tiny model covers tied embeddings
            kw["tie_word_embeddings"] = True
        return transformers.Qwen2Config(rope_theta=1e6, **kw)
    if family == "qwen3":
        return transformers.Qwen3Config(head_dim=16, rope_theta=1e6, **kw)
    rope = {"rope_theta": 1e6, "partial_rotary_factor": 0.25, "rope_type": "default"}
    if family == "qwen3_5":
        return transformers.Qwen3_5TextConfig(rope_parameters=rope, **{**kw, **_LINEAR, **overrides})
    if family == "qwen3_next":
        return transformers.Qwen3NextConfig(rope_parameters=rope, shared_expert_intermediate_size=32,
                                            **{**kw, **_LINEAR, **_MOE, **overrides})
    if family == "qwen3_5_moe":
        return transformers.Qwen3_5MoeTextConfig(rope_parameters=rope, shared_expert_intermediate_size=32,
                                                 **{**kw, **_LINEAR, **_MOE, **overrides})
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(head_dim=16, rope_theta=1e6, **{**kw, **_MOE, **overrides})
    if family == "mistral":
        return transformers.MistralConfig(**{**kw, **_WINDOW, **overrides})
    if family == "phi3":
        return transformers.Phi3Config(pad_token_id=0, **{**kw, **_WINDOW, **overrides})
    if family == "glm4":
        return transformers.Glm4Config(head_dim=16, pad_token_id=0, **kw)
    if family == "nemotron_h":
        kw = {k: v for k, v in kw.items() if k not in ("num_hidden_layers", "rms_norm_eps")}
        return transformers.NemotronHConfig(layer_norm_epsilon=1e-6, **{**kw, **_NEMOTRON, **overrides})
    raise ValueError(family)


def save_tiny(family: str, path: Path, seed: int = 0, **overrides) -> Path:
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Random init has tiny weights; larger ones make the logits discriminative.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 1:
                p.normal_(0.0, 0.2 if p.ndim > 1 else 1.0).clamp_(-1, 1)
    model.save_pretrained(path)
    return path


def hf_model(path: Path):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def hf_logits(path_or_model, ids: np.ndarray) -> np.ndarray:
    import torch

    model = hf_model(path_or_model) if isinstance(path_or_model, Path) else path_or_model
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


def hf_greedy(path_or_model, ids: list[int], max_new_tokens: int) -> list[int]:
    import torch

    model = hf_model(path_or_model) if isinstance(path_or_model, Path) else path_or_model
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             min_new_tokens=max_new_tokens, pad_token_id=0)
    return out[0, len(ids):].tolist()
