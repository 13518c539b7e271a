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
