"""Checks shared by the family tests (Llama derivatives, Nemotron-H): the cached modes
against the full forward, and a policy against one device."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpar.models.decoder import init_cache

POLICIES = Path(__file__).resolve().parents[1] / "examples" / "policies"


def run_modes(model, ids: np.ndarray, prompt_len: int, chunks=(), cache_len: int = 32) -> np.ndarray:
    """Prefill ids[:, :prompt_len], then `chunks` extend steps (chunked prefill), then
    decode the rest one token at a time; logits [B, T, V] at every position."""
    g = model._generator

    def step(state, tokens, positions, lengths, cache, mode):
        return nnx.merge(g.graphdef, state)(tokens, positions, cache, lengths, mode=mode)

    step = jax.jit(step, static_argnums=5)
    b = ids.shape[0]
    cache = init_cache(model.cfg, model.sharding, b, cache_len, model.dtype)
    pos = jnp.broadcast_to(jnp.arange(prompt_len), (b, prompt_len))
    logits, cache = step(g.state, ids[:, :prompt_len], pos, jnp.full((b,), prompt_len), cache, "prefill")
    out = [np.asarray(logits)]
    t = prompt_len
    for n in chunks:
        pos = t + jnp.broadcast_to(jnp.arange(n), (b, n))
        logits, cache = step(g.state, ids[:, t: t + n], pos, jnp.full((b,), n), cache, "extend")
        out.append(np.asarray(logits))
        t += n
    while t < ids.shape[1]:
        logits, cache = step(g.state, ids[:, t: t + 1], jnp.full((b, 1), t), jnp.ones((b,), jnp.int32),
                             cache, "decode")
        out.append(np.asarray(logits))
        t += 1
    return np.concatenate(out, axis=1)


def assert_matches_one_device(model, base, ids: np.ndarray, prompts, new_tokens: int = 12) -> None:
    """`model` (sharded) gives `base`'s (one device) logits on `ids` within float32
    tolerance and the same greedy tokens for `prompts`."""
    ref = base.logits(ids)
    np.testing.assert_allclose(model.logits(ids), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert model.generate(prompts, new_tokens, ignore_eos=True).token_ids == \
        base.generate(prompts, new_tokens, ignore_eos=True).token_ids
