"""Causal language-model loss: next-token cross-entropy over the valid (non-padding) targets."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_lm_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits [B, T, V] (float32), targets [B, T] int32 (the token after each input),
    weights [B, T]: 1 for a real target, 0 for padding. Returns (mean loss over the
    weighted targets, their count). Computed in float32; a batch with no target gives 0."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    weights = weights.astype(jnp.float32)
    count = jnp.sum(weights)
    loss = jnp.sum((log_z - target_logit) * weights) / jnp.maximum(count, 1.0)
    return loss, count
