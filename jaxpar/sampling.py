"""Token selection: greedy, temperature, top-k and top-p (nucleus), inside jit."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0

    def __post_init__(self):
        if not (self.temperature >= 0.0) or self.temperature != self.temperature:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k must be a whole number >= 0 (0 = off), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def filtered(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0

    def mode(self) -> tuple[bool, bool]:
        """The static part: which program to compile."""
        return self.greedy, self.filtered

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The traced part: changing these values does not recompile."""
        return (np.float32(max(self.temperature, 1e-6)), np.int32(self.top_k),
                np.float32(self.top_p))


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array, *, greedy: bool, filtered: bool) -> jax.Array:
    """logits: [B, V] float32 -> token ids [B] int32."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if filtered:
        order = jnp.argsort(-logits, axis=-1)
        ranked = jnp.take_along_axis(logits, order, axis=-1)
        rank = jnp.arange(logits.shape[-1])
        keep = jnp.where(top_k > 0, rank < top_k, True)
        probs = jax.nn.softmax(ranked, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = keep & (mass_before < top_p)
        ranked = jnp.where(keep, ranked, -jnp.inf)
        choice = jax.random.categorical(key, ranked, axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
