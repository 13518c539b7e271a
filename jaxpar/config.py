"""Hugging Face `config.json` -> one normalised `ModelConfig`.

Every family is reduced to the same dataclass so the decoder never branches on
`model_type`; per-layer differences live in `layer_types` (the mixer) and
`mlp_types` (the feed-forward block).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable

# Mixer kinds per layer (the names the rule table matches on).
ATTENTION = "attention"
LINEAR_ATTENTION = "linear_attention"
# Feed-forward kinds per layer.
MLP = "mlp"
MOE = "moe"
# Mamba2 (state-space) mixers, and "no block" for layers that hold one block only
# (Nemotron-H: a layer is a mixer *or* a feed-forward block, `layer_layout="single"`).
MAMBA = "mamba"
NO_BLOCK = "none"


class ConfigError(ValueError):
    """A model folder's config cannot be understood or is not supported."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    # Fraction of head_dim that is rotated (Qwen3-Next / Qwen3.5 rotate a quarter).
    partial_rotary_factor: float = 1.0
    # "default", "linear" or "llama3" (the scalings HF Llama checkpoints use).
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # YaRN ("yarn", DeepSeek-V3): ramp between interpolated and extrapolated frequencies over
    # the dims whose rotations at original_max_position_embeddings lie between beta_slow and
    # beta_fast; cos / sin scaled by attention_factor (None: derived from factor, mscale and
    # mscale_all_dim as HF does).
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    layer_types: tuple[str, ...]
    mlp_types: tuple[str, ...]
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # RMSNorm as (1 + w) * x (Qwen3-Next / 3.5) instead of w * x.
    zero_centred_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # dtype the checkpoint was saved in ("float32", "bfloat16", ...).
    checkpoint_dtype: str = "float32"
    # Prefix of the text model's weights inside the checkpoint ("model." for CausalLM folders).
    weight_prefix: str = "model."
    # Checkpoint tensors deliberately not loaded (vision tower, multi-token prediction).
    skipped_weight_prefixes: tuple[str, ...] = ()
    # Gated attention (Qwen3-Next / 3.5): q_proj also yields a per-head output gate.
    attn_output_gate: bool = False
    # Gated DeltaNet (linear attention) mixers.
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel: int = 4
    # "grouped" (Qwen3-Next: in_proj_qkvz / in_proj_ba grouped per key head) or
    # "split" (Qwen3.5: in_proj_qkv, in_proj_z, in_proj_b, in_proj_a).
    linear_projection_layout: str = ""
    # Mixture of experts.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    # --- Llama derivatives (Mistral, Phi-3, GLM-4) and Nemotron-H -----------------------
    # Sliding-window attention: a query at i sees keys i - W < j <= i (0 = no window).
    sliding_window: int = 0
    # Rotary pairs interleaved (x[2i], x[2i+1]) as GLM does, instead of split halves.
    rope_interleaved: bool = False
    # Attention without rotary embeddings (Nemotron-H: position comes from the SSM).
    use_rope: bool = True
    # Fused tensors on disk: qkv_proj = [q | k | v] rows (Phi-3), gate_up_proj = [gate | up].
    fused_qkv: bool = False
    fused_gate_up: bool = False
    # GLM-4: RMSNorms on the attention and MLP outputs before the residual adds.
    post_block_norms: bool = False
    # "pair": every layer is norm -> mixer -> residual, norm -> feed-forward -> residual;
    # "single" (Nemotron-H): every layer is norm -> one block -> residual, the block being
    # the layer's mixer (layer_types) or its feed-forward block (mlp_types), the other
    # entry NO_BLOCK. HF module names of "single" layers: layers.{i}.norm, layers.{i}.mixer.
    layer_layout: str = "pair"
    # "silu_gated" (SwiGLU: gate / up / down) or "relu2" (up -> relu(x)^2 -> down).
    mlp_activation: str = "silu_gated"
    # HF names of the embedding and the final norm under weight_prefix.
    embed_name: str = "embed_tokens"
    final_norm_name: str = "norm"
    # Mamba2 mixers: heads of mamba_head_dim channels, n_groups groups of B / C projections
    # (heads per group = heads / groups), a state of mamba_state_size per head and channel.
    mamba_num_heads: int = 0
    mamba_head_dim: int = 0
    mamba_state_size: int = 0
    mamba_n_groups: int = 1
    mamba_conv_kernel: int = 4
    mamba_chunk_size: int = 128
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    # dt = softplus(dt_raw + dt_bias) clamped below at this value (HF: time_step_min).
    mamba_dt_min: float = 0.0
    # ---- DeepSeek-V3 / V3.2 and multi-token prediction (docs/ARCHITECTURE.md, 15) ----
    # Multi-head latent attention (MLA) when kv_lora_rank > 0: q through a LoRA pair
    # (q_lora_rank; 0 = one q_proj), keys / values from a shared latent of kv_lora_rank plus
    # one rotary key of qk_rope_head_dim; per head qk_nope_head_dim + qk_rope_head_dim query /
    # key dims and v_head_dim value dims (its rotary pairs interleaved: rope_interleaved).
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # DeepSeek-V3.2 lightning indexer (when index_topk > 0): each query attends to the
    # index_topk cached tokens it scores highest.
    index_n_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0
    # MoE router: "softmax" (Qwen) or "sigmoid_grouped" (DeepSeek-V3: sigmoid scores, choice
    # on scores + e_score_correction_bias within the topk_group best of n_group expert
    # groups, weights from the plain scores times routed_scaling_factor).
    moe_router: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    # Shared expert: gated by sigmoid(shared_expert_gate(x)) (Qwen) or added as is (DeepSeek).
    shared_expert_gated: bool = True
    # Multi-token prediction layers: "qwen" (mtp.fc, mtp.pre_fc_norm_*, mtp.layers.k, mtp.norm)
    # or "deepseek" (model.layers.{num_layers + k}: enorm, hnorm, eh_proj, shared_head.norm).
    mtp_num_layers: int = 0
    mtp_layout: str = ""

    @property
    def attention_flavor(self) -> str:
        if self.kv_lora_rank > 0:
            return "mla"
        return "gated" if self.attn_output_gate else "gqa"

    @property
    def has_indexer(self) -> bool:
        return self.index_topk > 0

    @property
    def qk_head_dim(self) -> int:
        """MLA: query / key dims per head (no-rope part + rope part)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["rope"] = RopeConfig(**d["rope"])
        for key in ("layer_types", "mlp_types", "eos_token_ids", "skipped_weight_prefixes"):
            d[key] = tuple(d[key])
        return cls(**d)


# --------------------------------------------------------------------------- parsing helpers


def _rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    """Reads rope fields whether they are flat (`rope_theta`, `rope_scaling`) or nested
    (`rope_parameters`, transformers >= 5)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rope_type not in ("default", "linear", "llama3", "mrope", "yarn"):
        raise ConfigError(
            f"rope type {rope_type!r} is not supported (supported: default, linear, llama3, "
            "yarn, and text-only mrope)"
        )
    partial = merged.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    fields = dict(
        theta=float(theta),
        partial_rotary_factor=float(partial),
        # Text-only mrope is ordinary (partial) rope: all three position streams are equal.
        rope_type="default" if rope_type == "mrope" else rope_type,
        factor=float(merged.get("factor") or 1.0),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(merged.get("original_max_position_embeddings") or 8192),
    )
    fields.update(_yarn_fields(merged, hf, rope_type))
    return RopeConfig(**fields)


def _yarn_fields(merged: dict[str, Any], hf: dict[str, Any], rope_type: str) -> dict[str, Any]:
    if rope_type != "yarn":
        return {}
    out: dict[str, Any] = {}
    if merged.get("factor") is None:  # HF: the ratio of the context to the pretraining context
        orig = merged.get("original_max_position_embeddings") or hf.get("max_position_embeddings")
        out["factor"] = float(hf.get("max_position_embeddings", orig)) / float(orig)
    if merged.get("original_max_position_embeddings") is None:
        out["original_max_position_embeddings"] = int(hf.get("max_position_embeddings", 8192))
    for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        if merged.get(key):
            out[key] = float(merged[key])
    if merged.get("attention_factor") is not None:
        out["attention_factor"] = float(merged["attention_factor"])
    out["truncate"] = bool(merged.get("truncate", True))
    return out


def _eos_ids(hf: dict[str, Any]) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def _require(hf: dict[str, Any], *keys: str) -> None:
    missing = [k for k in keys if hf.get(k) is None]
    if missing:
        raise ConfigError(f"config.json of model_type {hf.get('model_type')!r} lacks {missing}")


def _dense_common(hf: dict[str, Any]) -> dict[str, Any]:
    _require(hf, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")
    heads = int(hf["num_attention_heads"])
    n_layers = int(hf["num_hidden_layers"])
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if hf.get("use_sliding_window"):
        raise ConfigError("sliding-window attention (use_sliding_window=true) is not supported")
    return dict(
        model_type=hf["model_type"],
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope=_rope_from_hf(hf),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        layer_types=(ATTENTION,) * n_layers,
        mlp_types=(MLP,) * n_layers,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf),
        checkpoint_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
    )


def _llama(hf: dict[str, Any]) -> dict[str, Any]:
    bias = bool(hf.get("attention_bias", False))
    return {**_dense_common(hf), "qkv_bias": bias, "o_bias": bias,
            "mlp_bias": bool(hf.get("mlp_bias", False))}


def _qwen2(hf: dict[str, Any]) -> dict[str, Any]:
    # Qwen2 always has q/k/v biases and none on o_proj.
    return {**_dense_common(hf), "qkv_bias": True}


def _qwen3(hf: dict[str, Any]) -> dict[str, Any]:
    bias = bool(hf.get("attention_bias", False))
    return {**_dense_common(hf), "qkv_bias": bias, "o_bias": bias, "qk_norm": True}


def _moe_fields(hf: dict[str, Any], *, norm_topk_default: bool) -> dict[str, Any]:
    # transformers >= 5 writes Qwen3-MoE's expert count as num_local_experts.
    hf = {**hf, "num_experts": hf.get("num_experts") or hf.get("num_local_experts")}
    _require(hf, "num_experts", "num_experts_per_tok", "moe_intermediate_size")
    return dict(num_experts=int(hf["num_experts"]), num_experts_per_tok=int(hf["num_experts_per_tok"]),
                moe_intermediate_size=int(hf["moe_intermediate_size"]),
                shared_expert_intermediate_size=int(hf.get("shared_expert_intermediate_size") or 0),
                norm_topk_prob=bool(hf.get("norm_topk_prob", norm_topk_default)))


def _sparse_mlp_types(hf: dict[str, Any], n_layers: int) -> tuple[str, ...]:
    """HF's rule: MoE where the layer is not in mlp_only_layers and (i + 1) % step == 0."""
    only = set(hf.get("mlp_only_layers") or [])
    step = int(hf.get("decoder_sparse_step") or 1)
    return tuple(MOE if i not in only and (i + 1) % step == 0 else MLP for i in range(n_layers))


def _qwen3_moe(hf: dict[str, Any]) -> dict[str, Any]:
    hf = {**hf, "intermediate_size": hf.get("intermediate_size") or hf.get("moe_intermediate_size")}
    out = {**_qwen3(hf), **_moe_fields(hf, norm_topk_default=False)}
    out["mlp_types"] = _sparse_mlp_types(hf, out["num_layers"])
    return out


def _hybrid_layer_types(hf: dict[str, Any], n_layers: int) -> tuple[str, ...]:
    kinds = hf.get("layer_types")
    if kinds is None:
        interval = int(hf.get("full_attention_interval") or 4)
        kinds = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layers)]
    names = {"full_attention": ATTENTION, "attention": ATTENTION, "linear_attention": LINEAR_ATTENTION}
    bad = sorted({k for k in kinds if k not in names})
    if bad or len(kinds) != n_layers:
        raise ConfigError(f"layer_types must list {n_layers} of full_attention / linear_attention, got {kinds}")
    return tuple(names[k] for k in kinds)


def _qwen3_hybrid(hf: dict[str, Any], *, layout: str, moe: bool) -> dict[str, Any]:
    """Qwen3-Next and Qwen3.5: Gated DeltaNet + gated attention, zero-centred norms."""
    hf = {**hf, "intermediate_size": hf.get("intermediate_size") or hf.get("moe_intermediate_size")}
    _require(hf, "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
             "linear_value_head_dim")
    out = _dense_common(hf)
    out.update(qkv_bias=bool(hf.get("attention_bias", False)), o_bias=bool(hf.get("attention_bias", False)),
               qk_norm=True, zero_centred_norm=True, attn_output_gate=True,
               layer_types=_hybrid_layer_types(hf, out["num_layers"]),
               linear_num_key_heads=int(hf["linear_num_key_heads"]),
               linear_num_value_heads=int(hf["linear_num_value_heads"]),
               linear_key_head_dim=int(hf["linear_key_head_dim"]),
               linear_value_head_dim=int(hf["linear_value_head_dim"]),
               linear_conv_kernel=int(hf.get("linear_conv_kernel_dim", 4)),
               linear_projection_layout=layout)
    if moe:
        out.update(_moe_fields(hf, norm_topk_default=True))
        out["mlp_types"] = _sparse_mlp_types(hf, out["num_layers"])
    out.update(_qwen_mtp_fields(hf))
    return out


def _qwen_mtp_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """Qwen3-Next / Qwen3.5 multi-token prediction head (`mtp.*`), when the config has one."""
    n = int(hf.get("mtp_num_hidden_layers") or 0)
    if n and hf.get("mtp_use_dedicated_embeddings"):
        raise ConfigError("mtp_use_dedicated_embeddings=true (an MTP head with its own embedding) "
                          "is not supported")
    return {"mtp_num_layers": n, "mtp_layout": "qwen" if n else "",
            "skipped_weight_prefixes": () if n else ("mtp.",)}


def _qwen3_5_conditional(hf: dict[str, Any]) -> dict[str, Any]:
    """Qwen3.5 image-text folders: the text model's config under text_config, its weights
    under model.language_model.*; the vision tower and MTP head are skipped."""
    text = dict(hf.get("text_config") or {})
    if not text:
        raise ConfigError(f"model_type {hf.get('model_type')!r} config has no text_config")
    text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", False))
    for key in ("bos_token_id", "eos_token_id", "torch_dtype", "dtype"):
        if text.get(key) is None and hf.get(key) is not None:
            text[key] = hf[key]
    inner = text.get("model_type") or ("qwen3_5_moe_text" if hf["model_type"] == "qwen3_5_moe" else "qwen3_5_text")
    out = FAMILIES[inner]({**text, "model_type": inner})
    out.update(weight_prefix="model.language_model.",
               skipped_weight_prefixes=("model.visual.",) + out["skipped_weight_prefixes"])
    return out


# --------------------------------------------------------------------------- Llama derivatives


def _window(hf: dict[str, Any]) -> int:
    """HF applies `sliding_window` whenever it is set (Mistral's config defaults it to 4096)."""
    w = hf.get("sliding_window")
    if w is None:
        return 0
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        raise ConfigError(f"sliding_window must be a positive integer or null, got {w!r}")
    return w


def _mistral(hf: dict[str, Any]) -> dict[str, Any]:
    return {**_llama(hf), "sliding_window": _window(hf)}


def _phi3(hf: dict[str, Any]) -> dict[str, Any]:
    """Phi-3: Llama with fused qkv_proj / gate_up_proj tensors and an optional window."""
    return {**_dense_common(hf), "sliding_window": _window(hf), "fused_qkv": True,
            "fused_gate_up": True}


def _glm4(hf: dict[str, Any]) -> dict[str, Any]:
    """GLM-4 (0414): q/k/v biases, interleaved partial rotary (half the head by default),
    fused gate_up_proj, and RMSNorms on the attention and MLP outputs."""
    rope = {**(hf.get("rope_parameters") or {})}
    if "partial_rotary_factor" not in rope and "partial_rotary_factor" not in hf:
        rope["partial_rotary_factor"] = 0.5  # Glm4Config's default
    out = _dense_common({**hf, "rope_parameters": rope})
    return {**out, "qkv_bias": bool(hf.get("attention_bias", True)), "rope_interleaved": True,
            "fused_gate_up": True, "post_block_norms": True}


# --------------------------------------------------------------------------- Nemotron-H

# hybrid_override_pattern characters, and the names transformers >= 5 writes in
# layers_block_type, -> (mixer kind, feed-forward kind) of the layer.
_NEMOTRON_BLOCKS = {"M": (MAMBA, NO_BLOCK), "*": (ATTENTION, NO_BLOCK), "-": (NO_BLOCK, MLP),
                    "E": (NO_BLOCK, MOE)}
_NEMOTRON_NAMES = {"linear_attention": "M", "mamba": "M", "full_attention": "*", "attention": "*",
                   "mlp": "-", "moe": "E"}


def _nemotron_pattern(hf: dict[str, Any]) -> str:
    blocks = hf.get("layers_block_type") or hf.get("layer_types")
    if blocks is not None:
        bad = sorted({b for b in blocks if b not in _NEMOTRON_NAMES})
        if bad:
            raise ConfigError(f"layers_block_type has unknown block type(s) {bad} (known: "
                              f"{', '.join(_NEMOTRON_NAMES)})")
        return "".join(_NEMOTRON_NAMES[b] for b in blocks)
    pattern = hf.get("hybrid_override_pattern")
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError("a nemotron_h config.json needs hybrid_override_pattern (e.g. 'M-M*-') "
                          "or layers_block_type")
    bad = sorted(set(pattern) - set(_NEMOTRON_BLOCKS))
    if bad:
        raise ConfigError(f"hybrid_override_pattern {pattern!r} has unknown character(s) {bad} "
                          "(M = Mamba2, * = attention, - = MLP, E = MoE)")
    return pattern


def _first(hf: dict[str, Any], *keys: str, default=None):
    """The first of `keys` present (HF renamed several Nemotron-H fields)."""
    for k in keys:
        if hf.get(k) is not None:
            return hf[k]
    return default


def _nemotron_h(hf: dict[str, Any]) -> dict[str, Any]:
    """Nemotron-H: one block per layer from the pattern (M Mamba2, * attention without
    rotary, - relu2 MLP, E MoE), RMSNorm with layer_norm_epsilon, weights under backbone."""
    pattern = _nemotron_pattern(hf)
    if "E" in pattern:
        raise ConfigError("nemotron_h MoE layers ('E' in hybrid_override_pattern) are not supported "
                          "yet; Mamba2 (M), attention (*) and MLP (-) layers are")
    act = hf.get("mlp_hidden_act", "relu2")
    if act != "relu2":
        raise ConfigError(f"nemotron_h mlp_hidden_act {act!r} is not supported (relu2 is)")
    if hf.get("mamba_hidden_act", "silu") != "silu":
        raise ConfigError(f"nemotron_h mamba_hidden_act {hf.get('mamba_hidden_act')!r} is not "
                          "supported (silu is)")
    n = len(pattern)
    hf = {**hf, "num_hidden_layers": n, "intermediate_size": hf.get("intermediate_size") or 1,
          "rms_norm_eps": hf.get("layer_norm_epsilon", 1e-5), "use_sliding_window": False}
    _require(hf, "mamba_num_heads", "mamba_head_dim", "ssm_state_size")
    out = _dense_common(hf)
    kinds = [_NEMOTRON_BLOCKS[c] for c in pattern]
    out.update(
        layer_types=tuple(k[0] for k in kinds), mlp_types=tuple(k[1] for k in kinds),
        layer_layout="single", mlp_activation="relu2", use_rope=False,
        mlp_bias=bool(hf.get("mlp_bias", False)), qkv_bias=bool(hf.get("attention_bias", False)),
        o_bias=bool(hf.get("attention_bias", False)), sliding_window=_window(hf),
        weight_prefix="backbone.", embed_name="embeddings", final_norm_name="norm_f",
        skipped_weight_prefixes=("mtp.",) if hf.get("num_nextn_predict_layers") else (),
        mamba_num_heads=int(hf["mamba_num_heads"]), mamba_head_dim=int(hf["mamba_head_dim"]),
        mamba_state_size=int(hf["ssm_state_size"]),
        mamba_n_groups=int(_first(hf, "n_groups", "mamba_n_groups", default=1)),
        mamba_conv_kernel=int(_first(hf, "conv_kernel", "mamba_d_conv", default=4)),
        mamba_chunk_size=int(_first(hf, "chunk_size", "mamba_chunk_size", default=128)),
        mamba_conv_bias=bool(_first(hf, "use_conv_bias", "mamba_conv_bias", default=True)),
        mamba_proj_bias=bool(hf.get("use_bias", False)),
        mamba_dt_min=float(_first(hf, "time_step_min", "mamba_dt_min", default=0.001)),
    )
    return out


# ---- DeepSeek-V3 / V3.2 (MLA, DeepSeek MoE, lightning indexer, MTP) -----------------------


def _deepseek(hf: dict[str, Any], *, indexer: bool) -> dict[str, Any]:
    """DeepSeek-V3 (`deepseek_v3`) and V3.2 (`deepseek_v32`): MLA attention on every layer,
    dense MLPs for the first `first_k_dense_replace` layers (or `mlp_layer_types`), MoE with
    sigmoid grouped routing and shared experts after; V3.2 adds the lightning indexer."""
    _require(hf, "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
             "moe_intermediate_size", "num_experts_per_tok")
    hf = dict(hf)
    hf["num_experts"] = hf.get("n_routed_experts") or hf.get("num_local_experts") or hf.get("num_experts")
    for key, allowed in (("hidden_act", "silu"), ("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
        if hf.get(key) not in (None, allowed):
            raise ConfigError(f"{hf['model_type']}: {key}={hf[key]!r} is not supported (only {allowed!r})")
    rope_dim = int(hf["qk_rope_head_dim"])
    # HF's rotary embedding reads head_dim = qk_rope_head_dim (the rotated part of q and k).
    out = _dense_common({**hf, "head_dim": rope_dim})
    n = out["num_layers"]
    kinds = hf.get("mlp_layer_types")
    if kinds is None:
        first_dense = int(hf.get("first_k_dense_replace") or 0)
        kinds = ["dense" if i < first_dense else "sparse" for i in range(n)]
    if len(kinds) != n or set(kinds) - {"dense", "sparse"}:
        raise ConfigError(f"mlp_layer_types must list {n} of dense / sparse, got {kinds}")
    n_shared = int(hf.get("n_shared_experts") or 0)
    out.update(_moe_fields({**hf, "shared_expert_intermediate_size": None}, norm_topk_default=True))
    out.update(
        mlp_types=tuple(MOE if k == "sparse" else MLP for k in kinds),
        qkv_bias=bool(hf.get("attention_bias", False)), o_bias=bool(hf.get("attention_bias", False)),
        q_lora_rank=int(hf.get("q_lora_rank") or 0), kv_lora_rank=int(hf["kv_lora_rank"]),
        qk_nope_head_dim=int(hf["qk_nope_head_dim"]), qk_rope_head_dim=rope_dim,
        v_head_dim=int(hf["v_head_dim"]),
        # V3.2 always interleaves the MLA rotary pairs (its indexer never does).
        rope_interleaved=True if indexer else bool(hf.get("rope_interleave", True)),
        moe_router="sigmoid_grouped", n_group=int(hf.get("n_group") or 1),
        topk_group=int(hf.get("topk_group") or 1),
        routed_scaling_factor=float(hf.get("routed_scaling_factor") or 1.0),
        shared_expert_intermediate_size=int(hf["moe_intermediate_size"]) * n_shared,
        shared_expert_gated=False,
    )
    if indexer:
        _require(hf, "index_topk", "index_n_heads", "index_head_dim")
        out.update(index_n_heads=int(hf["index_n_heads"]), index_head_dim=int(hf["index_head_dim"]),
                   index_topk=int(hf["index_topk"]))
    mtp = int(hf.get("num_nextn_predict_layers") or hf.get("num_mtp_layers") or 0)
    out.update(mtp_num_layers=mtp, mtp_layout="deepseek" if mtp else "")
    # An MTP layer's own copies of the embedding and LM head duplicate the main model's
    # (shared, as in DeepSeek's MTP design): not loaded. MTP layers the config does not
    # declare are skipped too.
    out["skipped_weight_prefixes"] = tuple(
        f"model.layers.{n + k}.{m}." for k in range(mtp) for m in ("embed_tokens", "shared_head.head")
    ) + (f"model.layers.{n + mtp}.",)
    return out


def mtp_weight_prefixes(cfg: ModelConfig) -> tuple[str, ...]:
    """Checkpoint name prefixes of the MTP layers' tensors."""
    if cfg.mtp_layout == "deepseek":
        return tuple(f"{cfg.weight_prefix}layers.{cfg.num_layers + k}." for k in range(cfg.mtp_num_layers))
    return ("mtp.",) if cfg.mtp_layout == "qwen" else ()


def without_mtp(cfg: ModelConfig) -> ModelConfig:
    """The config with its MTP layers dropped (their tensors, if any, are skipped)."""
    return dataclasses.replace(cfg, mtp_num_layers=0, mtp_layout="",
                               skipped_weight_prefixes=cfg.skipped_weight_prefixes + mtp_weight_prefixes(cfg))


# model_type -> normaliser. Later families register here and nowhere else.
FAMILIES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "qwen3_moe": _qwen3_moe,
    "qwen3_next": lambda hf: _qwen3_hybrid(hf, layout="grouped", moe=True),
    "qwen3_5_text": lambda hf: _qwen3_hybrid(hf, layout="split", moe=False),
    "qwen3_5_moe_text": lambda hf: _qwen3_hybrid(hf, layout="split", moe=True),
    "qwen3_5": _qwen3_5_conditional,
    "qwen3_5_moe": _qwen3_5_conditional,
    # Llama derivatives and Nemotron-H
    "mistral": _mistral,
    "phi3": _phi3,
    "glm4": _glm4,
    "nemotron_h": _nemotron_h,
    "deepseek_v3": lambda hf: _deepseek(hf, indexer=False),
    "deepseek_v32": lambda hf: _deepseek(hf, indexer=True),
}


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def config_from_hf_dict(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(
            f"model_type {model_type!r} is not supported; supported model types: "
            f"{', '.join(supported_model_types())}"
        )
    fields = FAMILIES[model_type](hf)
    cfg = ModelConfig(**fields)
    _validate(cfg)
    return cfg


def read_hf_config(model_dir: str | Path) -> dict[str, Any]:
    """The raw `config.json` dict of an HF model folder."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json in {model_dir} (expected a Hugging Face model folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON (truncated?): {e}") from e


def load_config(model_dir: str | Path) -> ModelConfig:
    return config_from_hf_dict(read_hf_config(model_dir))


def _validate(cfg: ModelConfig) -> None:
    if MAMBA in cfg.layer_types:
        if cfg.mamba_num_heads % cfg.mamba_n_groups:
            raise ConfigError(f"mamba_num_heads={cfg.mamba_num_heads} is not a multiple of "
                              f"n_groups={cfg.mamba_n_groups}")
        if cfg.mamba_chunk_size < 1:
            raise ConfigError(f"chunk_size={cfg.mamba_chunk_size} must be positive")
    _validate_deepseek(cfg)
    if LINEAR_ATTENTION in cfg.layer_types and cfg.linear_num_value_heads % max(cfg.linear_num_key_heads, 1):
        raise ConfigError(f"linear_num_value_heads={cfg.linear_num_value_heads} is not a multiple of "
                          f"linear_num_key_heads={cfg.linear_num_key_heads}")
    if MOE in cfg.mlp_types and not 0 < cfg.num_experts_per_tok <= cfg.num_experts:
        raise ConfigError(f"num_experts_per_tok={cfg.num_experts_per_tok} must be in 1..num_experts={cfg.num_experts}")
    if cfg.num_heads % cfg.num_kv_heads:
        raise ConfigError(
            f"num_attention_heads={cfg.num_heads} is not a multiple of "
            f"num_key_value_heads={cfg.num_kv_heads}"
        )
    rot = cfg.head_dim * cfg.rope.partial_rotary_factor
    if not math.isclose(rot, round(rot)) or round(rot) % 2:
        raise ConfigError(
            f"rotary dims head_dim*partial_rotary_factor={rot} must be an even integer"
        )


def _validate_deepseek(cfg: ModelConfig) -> None:
    if cfg.moe_router == "sigmoid_grouped" and MOE in cfg.mlp_types:
        if cfg.num_experts % cfg.n_group:
            raise ConfigError(f"n_routed_experts={cfg.num_experts} is not a multiple of n_group={cfg.n_group}")
        if not 0 < cfg.topk_group <= cfg.n_group:
            raise ConfigError(f"topk_group={cfg.topk_group} must be in 1..n_group={cfg.n_group}")
        if cfg.num_experts_per_tok > cfg.topk_group * (cfg.num_experts // cfg.n_group):
            raise ConfigError(f"num_experts_per_tok={cfg.num_experts_per_tok} exceeds the experts of the "
                              f"topk_group={cfg.topk_group} groups kept")
    if cfg.has_indexer:
        if cfg.index_head_dim < cfg.qk_rope_head_dim:
            raise ConfigError(f"index_head_dim={cfg.index_head_dim} is smaller than qk_rope_head_dim="
                              f"{cfg.qk_rope_head_dim} (the indexer rotates its first qk_rope_head_dim dims)")
        if cfg.q_lora_rank <= 0:
            raise ConfigError("the lightning indexer reads the q LoRA latent: q_lora_rank must be set")
