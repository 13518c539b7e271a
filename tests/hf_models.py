"""Tiny random Hugging Face checkpoints, made at test time, and the HF reference (torch).

Two passes run the tests (see `.ci/run`): Python 3.11 with torch, where HF transformers is
the reference, and Python 3.12 with the newest jax and no torch. So:

- Nothing here imports torch at module level. `HAS_TORCH` says whether it is installed;
  `needs_torch` (a mark) and `require_torch()` (inside a test or fixture) skip with
  `NO_TORCH_REASON` where it is not. `hf_model` / `hf_logits` / `hf_greedy` call
  `require_torch()` themselves, so a test that uses the HF reference skips by itself.
- `save_tiny` writes a tiny checkpoint either way: with torch, HF's own `save_pretrained`
  of a random model (the reference); without torch, the same config.json and
  generation_config.json (transformers' Config classes need no torch) and random float32
  safetensors with HF's tensor names and shapes (`hf_tensor_shapes`, HF's layout stated
  here independently of jaxpar's loader). `tests/test_hf_models.py` checks, on the pass
  with torch, that both ways write the same files, configs, names, shapes and dtypes.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

HAS_TORCH = importlib.util.find_spec("torch") is not None
NO_TORCH_REASON = "needs torch (the HF reference); runs in the Python 3.11 pass"
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason=NO_TORCH_REASON)


def require_torch():
    """torch, or a skip (with NO_TORCH_REASON) of the calling test or fixture."""
    if not HAS_TORCH:
        pytest.skip(NO_TORCH_REASON)
    import torch

    return torch


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
    if family in DEEPSEEK_FAMILIES:
        return deepseek_config(family, **overrides)
    raise ValueError(family)


# ---- DeepSeek-V3 / V3.2 (MLA, grouped sigmoid MoE, lightning indexer) and MTP layers ----

DEEPSEEK_FAMILIES = ("deepseek_v3", "deepseek_v32")
# Two layers (one dense, one MoE), 8 heads / experts / index heads so the RFC's tables fit 8
# devices; YaRN rope (DeepSeek-V3's) with interleaved rotary pairs; index_topk 8 so that
# sequences longer than 8 tokens take the sparse path.
_DEEPSEEK = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=8, q_lora_rank=32, kv_lora_rank=32,
                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                 num_experts_per_tok=2, n_group=4, topk_group=2, moe_intermediate_size=32,
                 n_shared_experts=1, routed_scaling_factor=2.5, first_k_dense_replace=1,
                 norm_topk_prob=True, max_position_embeddings=256, rms_norm_eps=1e-6,
                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                 rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                  "original_max_position_embeddings": 64, "mscale": 1.0,
                                  "mscale_all_dim": 1.0, "beta_fast": 32.0, "beta_slow": 1.0})
_INDEXER = dict(index_n_heads=8, index_head_dim=16, index_topk=8)


def deepseek_config(family: str, **overrides):
    import transformers

    kw = {**_DEEPSEEK, "num_nextn_predict_layers": 0, **overrides}
    if family == "deepseek_v3":
        kw["num_mtp_layers"] = kw.pop("num_nextn_predict_layers")
        return transformers.DeepseekV3Config(**kw)
    return transformers.DeepseekV32Config(**{**kw, **_INDEXER, **overrides})


def save_tiny(family: str, path: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random float32 checkpoint of `family` in `path`: HF's save_pretrained where
    torch is installed, `write_tiny` (same files, no torch) where it is not."""
    if not HAS_TORCH:
        return write_tiny(family, path, seed, **overrides)
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
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek's router bias (a buffer)
                b.normal_(0.0, 0.1)
    model.save_pretrained(path)
    return path


# --------------------------------------------------------------------------- without torch


def _linear(out: dict, name: str, rows: int, cols: int, bias: bool = False) -> None:
    out[f"{name}.weight"] = (rows, cols)
    if bias:
        out[f"{name}.bias"] = (rows,)


def _mlp(out: dict, prefix: str, hidden: int, ffn: int, bias: bool = False) -> None:
    _linear(out, prefix + "gate_proj", ffn, hidden, bias)
    _linear(out, prefix + "up_proj", ffn, hidden, bias)
    _linear(out, prefix + "down_proj", hidden, ffn, bias)


def hf_tensor_shapes(hf: dict) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor HF's `save_pretrained` writes for the CausalLM of a
    config.json (`hf`), for the families of this module. HF writes MoE experts per expert
    (`mlp.experts.{e}.gate_proj.weight` ...), its gated attention as a q_proj twice as
    tall, Qwen3-Next's GDN projections fused per key head (`in_proj_qkvz`, `in_proj_ba`)
    and Qwen3.5's split (`in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`)."""
    kind = hf["model_type"]
    if kind == "nemotron_h":
        return _nemotron_h_tensor_shapes(hf)
    if kind in DEEPSEEK_FAMILIES:
        return _deepseek_tensor_shapes(hf)
    if kind not in ("llama", "qwen2", "qwen3", "qwen3_moe", "qwen3_next", "qwen3_5_text", "qwen3_5_moe_text",
                    "mistral", "phi3", "glm4"):
        raise ValueError(f"no torch-free HF tensor layout for model_type {kind!r}: add it to "
                         "tests/hf_models.hf_tensor_shapes (tests/test_hf_models.py checks it against HF)")
    hidden, layers = hf["hidden_size"], hf["num_hidden_layers"]
    heads, kv_heads = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hidden // heads
    hybrid = kind in ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")
    qkv_bias = kind == "qwen2" or bool(hf.get("attention_bias"))
    o_bias = kind not in ("qwen2", "glm4") and bool(hf.get("attention_bias"))  # GLM-4: q, k, v only
    experts = hf.get("num_experts") or hf.get("num_local_experts") or 0
    sparse_step = hf.get("decoder_sparse_step") or 1
    dense_only = set(hf.get("mlp_only_layers") or [])

    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (hf["vocab_size"], hidden)}
    for i, mixer in enumerate(hf.get("layer_types") or ["full_attention"] * layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (hidden,)
        out[p + "post_attention_layernorm.weight"] = (hidden,)
        if kind == "glm4":  # norms of the attention and MLP outputs
            out[p + "post_self_attn_layernorm.weight"] = out[p + "post_mlp_layernorm.weight"] = (hidden,)
        if mixer == "full_attention":
            a = p + "self_attn."
            if kind == "phi3":  # q, k and v fused
                _linear(out, a + "qkv_proj", (heads + 2 * kv_heads) * head_dim, hidden)
            else:
                _linear(out, a + "q_proj", heads * head_dim * (2 if hybrid else 1), hidden, qkv_bias)
                _linear(out, a + "k_proj", kv_heads * head_dim, hidden, qkv_bias)
                _linear(out, a + "v_proj", kv_heads * head_dim, hidden, qkv_bias)
            _linear(out, a + "o_proj", hidden, heads * head_dim, o_bias)
            if kind not in ("llama", "qwen2", "mistral", "phi3", "glm4"):
                out[a + "q_norm.weight"] = out[a + "k_norm.weight"] = (head_dim,)
        else:
            a = p + "linear_attn."
            vh = hf["linear_num_value_heads"]
            kd = hf["linear_num_key_heads"] * hf["linear_key_head_dim"]
            vd = vh * hf["linear_value_head_dim"]
            if kind == "qwen3_next":
                _linear(out, a + "in_proj_qkvz", 2 * kd + 2 * vd, hidden)
                _linear(out, a + "in_proj_ba", 2 * vh, hidden)
            else:
                _linear(out, a + "in_proj_qkv", 2 * kd + vd, hidden)
                _linear(out, a + "in_proj_z", vd, hidden)
                _linear(out, a + "in_proj_b", vh, hidden)
                _linear(out, a + "in_proj_a", vh, hidden)
            out[a + "conv1d.weight"] = (2 * kd + vd, 1, hf["linear_conv_kernel_dim"])
            out[a + "dt_bias"] = out[a + "A_log"] = (vh,)
            out[a + "norm.weight"] = (hf["linear_value_head_dim"],)
            _linear(out, a + "out_proj", hidden, vd)
        m = p + "mlp."
        if experts and i not in dense_only and (i + 1) % sparse_step == 0:
            _linear(out, m + "gate", experts, hidden)
            for e in range(experts):
                _mlp(out, f"{m}experts.{e}.", hidden, hf["moe_intermediate_size"])
            if hf.get("shared_expert_intermediate_size"):
                _mlp(out, m + "shared_expert.", hidden, hf["shared_expert_intermediate_size"])
                _linear(out, m + "shared_expert_gate", 1, hidden)
        elif kind in ("phi3", "glm4"):  # gate and up fused
            _linear(out, m + "gate_up_proj", 2 * hf["intermediate_size"], hidden)
            _linear(out, m + "down_proj", hidden, hf["intermediate_size"])
        else:
            _mlp(out, m, hidden, hf["intermediate_size"], bool(hf.get("mlp_bias")))
    out["model.norm.weight"] = (hidden,)
    if not hf.get("tie_word_embeddings"):
        out["lm_head.weight"] = (hf["vocab_size"], hidden)
    return out


def _nemotron_h_tensor_shapes(hf: dict) -> dict[str, tuple[int, ...]]:
    """Nemotron-H: one block per layer under `backbone.` (Mamba2 mixer, attention without
    biases or rotary, relu2 MLP); `layers_block_type` names the kinds."""
    hidden, b = hf["hidden_size"], "backbone."
    heads, kv_heads, head_dim = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
    inner = hf["mamba_num_heads"] * hf["mamba_head_dim"]
    conv = inner + 2 * hf["n_groups"] * hf["ssm_state_size"]
    out: dict[str, tuple[int, ...]] = {b + "embeddings.weight": (hf["vocab_size"], hidden)}
    for i, kind in enumerate(hf["layers_block_type"]):
        p = f"{b}layers.{i}."
        out[p + "norm.weight"] = (hidden,)
        m = p + "mixer."
        if kind in ("mamba", "linear_attention"):
            _linear(out, m + "in_proj", conv + inner + hf["mamba_num_heads"], hidden, hf["use_bias"])
            out[m + "conv1d.weight"] = (conv, 1, hf["conv_kernel"])
            if hf["use_conv_bias"]:
                out[m + "conv1d.bias"] = (conv,)
            out[m + "dt_bias"] = out[m + "A_log"] = out[m + "D"] = (hf["mamba_num_heads"],)
            out[m + "norm.weight"] = (inner,)
            _linear(out, m + "out_proj", hidden, inner, hf["use_bias"])
        elif kind in ("attention", "full_attention"):
            bias = bool(hf.get("attention_bias"))
            _linear(out, m + "q_proj", heads * head_dim, hidden, bias)
            _linear(out, m + "k_proj", kv_heads * head_dim, hidden, bias)
            _linear(out, m + "v_proj", kv_heads * head_dim, hidden, bias)
            _linear(out, m + "o_proj", hidden, heads * head_dim, bias)
        elif kind == "mlp":
            _linear(out, m + "up_proj", hf["intermediate_size"], hidden, bool(hf.get("mlp_bias")))
            _linear(out, m + "down_proj", hidden, hf["intermediate_size"], bool(hf.get("mlp_bias")))
        else:
            raise ValueError(f"no torch-free layout for Nemotron-H block kind {kind!r}")
    out[b + "norm_f.weight"] = (hidden,)
    if not hf.get("tie_word_embeddings"):
        out["lm_head.weight"] = (hf["vocab_size"], hidden)
    return out


def _deepseek_tensor_shapes(hf: dict) -> dict[str, tuple[int, ...]]:
    """DeepSeek-V3 / V3.2 as HF writes them: MLA's LoRA pairs (`q_a_proj`, `q_a_layernorm`,
    `q_b_proj`, or one `q_proj` without q_lora_rank; `kv_a_proj_with_mqa` = latent + rope key,
    `kv_a_layernorm`, `kv_b_proj` = per head no-rope key + value), V3.2's `indexer`, dense MLPs
    for `mlp_layer_types` "dense" (else the first `first_k_dense_replace` layers), and MoE
    layers with `gate.weight`, the `gate.e_score_correction_bias` buffer, experts per expert
    and ungated `shared_experts` of n_shared_experts * moe_intermediate_size."""
    hidden, layers, heads = hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"]
    nope, rope, vd, lora = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"], hf["v_head_dim"], hf["kv_lora_rank"]
    q_lora, bias = hf.get("q_lora_rank") or 0, bool(hf.get("attention_bias"))
    kinds = hf.get("mlp_layer_types") or ["dense" if i < (hf.get("first_k_dense_replace") or 0) else "sparse"
                                          for i in range(layers)]
    experts, moe_ffn = hf["n_routed_experts"], hf["moe_intermediate_size"]
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (hf["vocab_size"], hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = out[p + "post_attention_layernorm.weight"] = (hidden,)
        a = p + "self_attn."
        if q_lora:
            _linear(out, a + "q_a_proj", q_lora, hidden, bias)
            out[a + "q_a_layernorm.weight"] = (q_lora,)
            _linear(out, a + "q_b_proj", heads * (nope + rope), q_lora)
        else:
            _linear(out, a + "q_proj", heads * (nope + rope), hidden)
        _linear(out, a + "kv_a_proj_with_mqa", lora + rope, hidden, bias)
        out[a + "kv_a_layernorm.weight"] = (lora,)
        _linear(out, a + "kv_b_proj", heads * (nope + vd), lora)
        _linear(out, a + "o_proj", hidden, heads * vd, bias)
        if hf["model_type"] == "deepseek_v32":
            x, d = a + "indexer.", hf["index_head_dim"]
            _linear(out, x + "wq_b", hf["index_n_heads"] * d, q_lora)
            _linear(out, x + "wk", d, hidden)
            out[x + "k_norm.weight"] = out[x + "k_norm.bias"] = (d,)
            _linear(out, x + "weights_proj", hf["index_n_heads"], hidden)
        m = p + "mlp."
        if kinds[i] == "sparse":
            _linear(out, m + "gate", experts, hidden)
            out[m + "gate.e_score_correction_bias"] = (experts,)
            for e in range(experts):
                _mlp(out, f"{m}experts.{e}.", hidden, moe_ffn)
            if hf.get("n_shared_experts"):
                _mlp(out, m + "shared_experts.", hidden, moe_ffn * hf["n_shared_experts"])
        else:
            _mlp(out, m, hidden, hf["intermediate_size"])
    out["model.norm.weight"] = (hidden,)
    if not hf.get("tie_word_embeddings"):
        out["lm_head.weight"] = (hf["vocab_size"], hidden)
    return out


def _save_configs(cfg, path: Path) -> None:
    """config.json and generation_config.json as a CausalLM's save_pretrained writes them."""
    from transformers import GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cfg.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[cfg.model_type]]
    cfg.save_pretrained(path)
    GenerationConfig.from_model_config(cfg).save_pretrained(path)


def write_tiny(family: str, path: Path, seed: int = 0, **overrides) -> Path:
    """`save_tiny` without torch: HF's config files and random float32 safetensors of HF's
    tensor names and shapes (N(0, 0.2) matrices, N(0, 1) vectors, clipped to [-1, 1], as
    `save_tiny` draws them with torch)."""
    from safetensors.numpy import save_file

    cfg = tiny_config(family, **overrides)
    cfg.dtype = "float32"
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _save_configs(cfg, path)
    rng = np.random.default_rng(seed)
    tensors = {name: np.clip(rng.normal(0.0, 0.2 if len(shape) > 1 else 1.0, shape), -1, 1).astype(np.float32)
               for name, shape in hf_tensor_shapes(cfg.to_dict()).items()}
    for name in tensors:  # DeepSeek's router bias, drawn as save_tiny draws it
        if name.endswith("e_score_correction_bias"):
            tensors[name] = np.clip(rng.normal(0.0, 0.1, tensors[name].shape), -1, 1).astype(np.float32)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def save_copy(src: Path, dst: Path, *, dtype: str | None = None, max_shard_size: str | None = None) -> Path:
    """`src` (a tiny checkpoint) saved again in `dtype` and/or in shards of at most
    `max_shard_size` (with `model.safetensors.index.json`): HF's save_pretrained where torch
    is installed, the same files written with numpy where it is not."""
    if HAS_TORCH:
        import torch

        model = hf_model(src)
        if dtype is not None:
            model = model.to(getattr(torch, dtype))
        model.save_pretrained(dst, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
        return Path(dst)
    return save_copy_without_torch(src, dst, dtype=dtype, max_shard_size=max_shard_size)


def save_copy_without_torch(src: Path, dst: Path, *, dtype: str | None = None,
                            max_shard_size: str | None = None) -> Path:
    """`save_copy` with numpy: config files with the new dtype, tensors cast, shards filled
    in name order (HF's naming and index file)."""
    import ml_dtypes
    from safetensors.numpy import load_file, save_file
    from transformers import AutoConfig

    from jaxpar.checkpoint.export_hf import parse_size  # HF's size convention ("200KB" = 200e3)

    cfg = AutoConfig.from_pretrained(src)
    tensors = load_file(str(Path(src) / "model.safetensors"))
    if dtype is not None:
        np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
        tensors = {k: v.astype(np_dtype) for k, v in tensors.items()}
        cfg.dtype = dtype
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if (Path(src) / "generation_config.json").is_file():
        shutil.copyfile(Path(src) / "generation_config.json", dst / "generation_config.json")
    cfg.save_pretrained(dst)
    limit = parse_size(max_shard_size) if max_shard_size else math.inf
    shards: list[dict] = []
    size = 0
    for name in sorted(tensors):
        if not shards or (size and size + tensors[name].nbytes > limit):
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += tensors[name].nbytes
    if len(shards) == 1:
        save_file(shards[0], str(dst / "model.safetensors"), metadata={"format": "pt"})
        return dst
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(dst / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return dst


# --------------------------------------------------------------------------- the HF reference


def hf_model(path: Path):
    torch = require_torch()
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def hf_logits(path_or_model, ids: np.ndarray) -> np.ndarray:
    torch = require_torch()

    model = hf_model(path_or_model) if isinstance(path_or_model, Path) else path_or_model
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


def hf_greedy(path_or_model, ids: list[int], max_new_tokens: int) -> list[int]:
    torch = require_torch()

    model = hf_model(path_or_model) if isinstance(path_or_model, Path) else path_or_model
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             min_new_tokens=max_new_tokens, pad_token_id=0)
    return out[0, len(ids):].tolist()


def add_mtp_layer(path: Path, family: str, seed: int = 1) -> Path:
    """Appends one random multi-token-prediction layer to a saved tiny checkpoint (transformers
    never writes MTP weights) and declares it in config.json: DeepSeek's
    `model.layers.{N}.*` (a MoE decoder layer, enorm, hnorm, eh_proj, shared_head.norm and
    copies of the embedding and head) or Qwen's `mtp.*` (fc, pre_fc_norm_embedding /
    pre_fc_norm_hidden, layers.0 = a full-attention decoder layer, norm). numpy only."""
    import json

    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(seed)
    tensors = load_file(path / "model.safetensors")
    cfg = json.loads((path / "config.json").read_text())
    n, e = cfg["num_hidden_layers"], cfg["hidden_size"]

    def rand(shape):
        return (np.clip(rng.normal(0, 0.2, shape), -1, 1) if len(shape) > 1 else rng.normal(0, 1, shape)
                ).astype(np.float32)

    if family in DEEPSEEK_FAMILIES:
        src, dst = f"model.layers.{n - 1}.", f"model.layers.{n}."  # the last layer is a MoE layer
        new = {dst + k[len(src):]: rand(v.shape) for k, v in tensors.items() if k.startswith(src)}
        new.update({dst + "enorm.weight": rand((e,)), dst + "hnorm.weight": rand((e,)),
                    dst + "eh_proj.weight": rand((e, 2 * e)), dst + "shared_head.norm.weight": rand((e,)),
                    dst + "embed_tokens.weight": tensors["model.embed_tokens.weight"],
                    dst + "shared_head.head.weight": tensors["lm_head.weight"]})
        cfg["num_nextn_predict_layers"] = 1
    else:
        full = cfg["layer_types"].index("full_attention")
        src = f"model.layers.{full}."
        new = {"mtp.layers.0." + k[len(src):]: rand(v.shape) for k, v in tensors.items() if k.startswith(src)}
        new.update({"mtp.fc.weight": rand((e, 2 * e)), "mtp.pre_fc_norm_embedding.weight": rand((e,)),
                    "mtp.pre_fc_norm_hidden.weight": rand((e,)), "mtp.norm.weight": rand((e,))})
        cfg["mtp_num_hidden_layers"] = 1
    save_file({**tensors, **new}, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    return path


def mtp_reference_logits(path: Path, family: str, ids: np.ndarray) -> np.ndarray:
    """The MTP layer's logits at every position i < T - 1 (input: the main model's final hidden
    state at i and the token at i + 1), recomputed in torch from transformers' own decoder
    layer, norm and rotary classes -- transformers does not run these checkpoints' MTP layers.
    Returns [B, T - 1, V]."""
    import copy
    import json

    import torch
    from safetensors.numpy import load_file

    main = hf_model(path)
    cfg = json.loads((path / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    tensors = load_file(path / "model.safetensors")
    if family in DEEPSEEK_FAMILIES:
        prefix = f"model.layers.{n}."
        names = {"enorm": "enorm", "hnorm": "hnorm", "fc": "eh_proj", "final": "shared_head.norm"}
    else:
        prefix = "mtp.layers.0."
        names = {"enorm": "../pre_fc_norm_embedding", "hnorm": "../pre_fc_norm_hidden", "fc": "../fc",
                 "final": "../norm"}

    def tensor(name):
        full = ("mtp." + name[3:]) if name.startswith("../") else prefix + name
        return torch.from_numpy(tensors[full + ".weight"])

    layer_cfg = copy.deepcopy(main.config)
    if family in DEEPSEEK_FAMILIES:  # a MoE layer
        layer_cfg.first_k_dense_replace = 0
        if getattr(layer_cfg, "mlp_layer_types", None) is not None:
            layer_cfg.mlp_layer_types = ["sparse"]
    else:
        layer_cfg.layer_types = ["full_attention"]
        if getattr(layer_cfg, "mlp_only_layers", None):
            layer_cfg.mlp_only_layers = []
    layer = type(main.model.layers[-1])(layer_cfg, 0).eval()
    own = {k[len(prefix):]: torch.from_numpy(v) for k, v in tensors.items() if k.startswith(prefix)
           and not k[len(prefix):].startswith(("enorm", "hnorm", "eh_proj", "shared_head", "embed_tokens"))}
    own = _fuse_experts(own)
    missing, unexpected = layer.load_state_dict(own, strict=False)
    if unexpected or [m for m in missing if "e_score_correction_bias" not in m]:
        raise AssertionError(f"MTP reference layer: missing {missing}, unexpected {unexpected}")
    norm_cls = type(main.model.norm)
    e = cfg["hidden_size"]
    norms = {}
    for key in ("enorm", "hnorm", "final"):
        norms[key] = norm_cls(e, eps=cfg["rms_norm_eps"]).eval()
        norms[key].weight.data.copy_(tensor(names[key]))
    fc = torch.nn.Linear(2 * e, e, bias=False)
    fc.weight.data.copy_(tensor(names["fc"]))
    ids_t = torch.tensor(np.asarray(ids), dtype=torch.long)
    t = ids_t.shape[1] - 1
    with torch.no_grad():
        hidden = main.model(ids_t).last_hidden_state[:, :-1]
        emb = main.model.embed_tokens(ids_t[:, 1:])
        u = fc(torch.cat([norms["enorm"](emb), norms["hnorm"](hidden)], dim=-1))
        pos = torch.arange(t)[None].expand(ids_t.shape[0], t)
        mask = torch.full((t, t), torch.finfo(torch.float32).min).triu(1)[None, None]
        rope = main.model.rotary_emb(u, pos)
        out = layer(u, attention_mask=mask, position_ids=pos, position_embeddings=rope)
        out = out[0] if isinstance(out, tuple) else out
        return main.lm_head(norms["final"](out)).float().numpy()


def _fuse_experts(state: dict) -> dict:
    """Per-expert tensors as checkpoints store them (`mlp.experts.{e}.gate_proj.weight`, ...)
    -> the fused `mlp.experts.gate_up_proj` [E, 2I, H] / `down_proj` [E, H, I] of
    transformers' modules."""
    import re

    import torch

    per = {}
    for key in list(state):
        m = re.fullmatch(r"(.*experts)\.(\d+)\.(gate|up|down)_proj\.weight", key)
        if m:
            per.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = state.pop(key)
    for base, experts in per.items():
        order = [experts[e] for e in sorted(experts)]
        state[f"{base}.gate_up_proj"] = torch.stack([torch.cat([x["gate"], x["up"]]) for x in order])
        state[f"{base}.down_proj"] = torch.stack([x["down"] for x in order])
    return state
