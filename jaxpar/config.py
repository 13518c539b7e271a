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

    @property
    def attention_flavor(self) -> str:
        return "gqa"

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


# model_type -> normaliser. Later families register here and nowhere else.
FAMILIES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
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


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json in {model_dir} (expected a Hugging Face model folder)")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    return config_from_hf_dict(hf)


def _validate(cfg: ModelConfig) -> None:
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
