"""Random parameters for training from scratch (and for tests that need no checkpoint)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpar.config import ModelConfig
from jaxpar.assembly import abstract_model
from jaxpar.sharding.model_sharding import ModelSharding


def _init_value(path: tuple, shape, rng: np.random.Generator, std: float, cfg: ModelConfig) -> np.ndarray:
    if path[-1] == "weight" and str(path[-2]).endswith("norm"):
        # RMSNorm scales start at 1: w * x, or (1 + w) * x with w = 0 when zero-centred (the
        # gated norm inside Gated DeltaNet is plain w * x)
        gated = len(path) >= 3 and path[-3] == "linear_attn"
        return np.full(shape, 0.0 if cfg.zero_centred_norm and not gated else 1.0, np.float32)
    if path[-1] == "bias":
        return np.zeros(shape, np.float32)
    if path[-1] == "A_log":  # decay rates exp(A) spread over [1, 16], as the Qwen3-Next init
        return np.log(rng.uniform(1.0, 16.0, shape)).astype(np.float32)
    if path[-1] == "dt_bias":
        return np.ones(shape, np.float32)
    return (std * rng.standard_normal(shape, np.float32)).astype(np.float32)


def init_params(cfg: ModelConfig, sharding: ModelSharding, seed: int = 0, dtype=jnp.float32,
                std: float = 0.02) -> nnx.State:
    """The model's parameters, random: normal(0, std) matrices, unit norm scales, zero biases
    (Gated DeltaNet: A_log = log U(1, 16), dt_bias 1). The values depend only on `seed`, not
    on the sharding; each tensor is drawn on the host (one at a time) and every device takes
    its slice, so this suits models that fit in host memory one tensor at a time."""
    _, state = abstract_model(cfg, sharding, dtype)
    for i, (path, var) in enumerate(nnx.to_flat_state(state)):
        aval = var.get_value()
        value = _init_value(path, aval.shape, np.random.default_rng([seed, i]), std, cfg).astype(aval.dtype)
        var.set_value(jax.make_array_from_callback(aval.shape, aval.sharding, lambda index, v=value: v[index]))
    return state
