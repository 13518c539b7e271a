"""Random parameters for training from scratch (and for tests that need no checkpoint)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.config import ModelConfig
from jaxpar.sharding.inspect import abstract_model
from jaxpar.sharding.model_sharding import ModelSharding


def _init_value(path: tuple, shape, dtype, key, std: float, cfg: ModelConfig):
    if path[-1] == "weight" and str(path[-2]).endswith("norm"):
        # RMSNorm scales start at 1: w * x, or (1 + w) * x with w = 0 when zero-centred (the
        # gated norm inside Gated DeltaNet is plain w * x)
        gated = len(path) >= 3 and path[-3] == "linear_attn"
        return jnp.full(shape, 0.0 if cfg.zero_centred_norm and not gated else 1.0, dtype)
    if path[-1] == "bias":
        return jnp.zeros(shape, dtype)
    if path[-1] == "A_log":  # decay rates exp(A) spread over [1, 16], as the Qwen3-Next init
        return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)).astype(dtype)
    if path[-1] == "dt_bias":
        return jnp.ones(shape, dtype)
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def init_params(cfg: ModelConfig, sharding: ModelSharding, key: jax.Array, dtype=jnp.float32,
                std: float = 0.02) -> nnx.State:
    """The model's parameters, random, each created directly in its sharding: normal(0, std)
    matrices, unit norm scales, zero biases (Gated DeltaNet: A_log = log U(1, 16), dt_bias 1)."""
    _, state = abstract_model(cfg, sharding, dtype)
    flat = nnx.to_flat_state(state)
    for i, (path, var) in enumerate(flat):
        aval = var.get_value()
        make = jax.jit(lambda k, path=path, aval=aval: _init_value(path, aval.shape, aval.dtype, k, std, cfg),
                       out_shardings=aval.sharding)
        var.set_value(make(jax.random.fold_in(key, i)))
    return state
