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

    @property
    def attention_flavor(self) -> str:
        return "gated" if self.attn_output_gate else "gqa"

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
    if rope_type not in ("default", "linear", "llama3", "mrope"):
        raise ConfigError(
            f"rope type {rope_type!r} is not supported (supported: default, linear, llama3, "
            "and text-only mrope)"
        )
    partial = merged.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    return RopeConfig(
        theta=float(theta),
        partial_rotary_factor=float(partial),
        # Text-only mrope is ordinary (partial) rope: all three position streams are equal.
        rope_type="default" if rope_type == "mrope" else rope_type,
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(merged.get("original_max_position_embeddings", 8192)),
    )


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
    return out


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
    out.update(weight_prefix="model.language_model.", skipped_weight_prefixes=("model.visual.", "mtp."))
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
