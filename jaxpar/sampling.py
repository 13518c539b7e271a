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
        if not (0.0 <= self.temperature < float("inf")):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k must be a whole number >= 0 (0 = off), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.seed, bool) or int(self.seed) != self.seed:
            raise ValueError(f"seed must be a whole number, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def filtered(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0

    def mode(self) -> tuple[bool, bool]:
        """(greedy, filtered), for callers that specialise `sample` statically."""
        return self.greedy, self.filtered

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The traced part: one compiled program serves every sampling setting."""
        return (np.float32(self.temperature), np.int32(self.top_k), np.float32(self.top_p))


def _greedy(logits: jax.Array) -> jax.Array:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _draw(logits: jax.Array, key: jax.Array) -> jax.Array:
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _draw_filtered(logits: jax.Array, key: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
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


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array, *, greedy: bool | None = None, filtered: bool | None = None) -> jax.Array:
    """logits: [B, V] float32 -> token ids [B] int32. Greedy when temperature == 0.

    With `greedy` / `filtered` left None the choice is made at run time (`lax.cond`
    runs only the branch taken), so one compiled program serves greedy, plain and
    top-k / top-p sampling; passing them specialises the program statically.
    """
    if greedy is None:
        greedy = temperature <= 0
    if filtered is None:
        filtered = (top_k > 0) | (top_p < 1)

    def draw(logits):
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
        if isinstance(filtered, bool):
            return _draw_filtered(scaled, key, top_k, top_p) if filtered else _draw(scaled, key)
        return jax.lax.cond(filtered, lambda x: _draw_filtered(x, key, top_k, top_p),
                            lambda x: _draw(x, key), scaled)

    if isinstance(greedy, bool):
        return _greedy(logits) if greedy else draw(logits)
    return jax.lax.cond(greedy, _greedy, draw, logits)


def row_keys(seeds: jax.Array, steps: jax.Array) -> jax.Array:
    """One PRNG key per row from its own seed and step, so a request's draws do not
    depend on which other requests share its batch."""
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seeds, steps)


def sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                top_p: jax.Array) -> jax.Array:
    """Per-row settings: logits [B, V] float32, keys [B], temperature / top_k / top_p [B]
    -> token ids [B] int32. A row with temperature 0 is greedy.

    One compiled program serves any mix: the drawing branch runs only when some row
    samples and the sort only when some row filters (`lax.cond` on the whole batch); rows
    without filters draw from the unsorted logits either way, so a row's tokens do not
    depend on its neighbours' settings.
    """
    greedy = _greedy(logits)
    sampled = temperature > 0
    filtered = sampled & ((top_k > 0) | (top_p < 1))

    def draw(logits):
        scaled = logits / jnp.where(sampled, temperature, 1.0)[:, None]
        plain = jax.vmap(_draw)(scaled, keys)

        def with_filters(scaled):
            order = jnp.argsort(-scaled, axis=-1)
            ranked = jnp.take_along_axis(scaled, order, axis=-1)
            rank = jnp.arange(scaled.shape[-1])[None, :]
            keep = jnp.where(top_k[:, None] > 0, rank < top_k[:, None], True)
            probs = jax.nn.softmax(ranked, axis=-1)
            keep = keep & (jnp.cumsum(probs, axis=-1) - probs < top_p[:, None])
            choice = jax.vmap(_draw)(jnp.where(keep, ranked, -jnp.inf), keys)
            picked = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
            return jnp.where(filtered, picked, plain)

        tokens = jax.lax.cond(jnp.any(filtered), with_filters, lambda _: plain, scaled)
        return jnp.where(sampled, tokens, greedy)

    return jax.lax.cond(jnp.any(sampled), draw, lambda _: greedy, logits)
