"""The engine's compiled programs, each one jitted step over fixed shapes.

Prefill side (on the prefill stage's devices):
  * `chunk`: `prefill_rows` requests advance by up to C prompt tokens each (mode "extend",
    per-row positions from the cache's lengths; rows starting a request are reset first),
    and the first token is sampled for rows whose prompt ends in the chunk. One program
    per chunk length bucket; the cache is donated.
  * `extract`: one row of the prefill cache as a payload in the decode layout's order.
Decode side (on the decode stage's devices):
  * `insert`: a payload into a free slot (donated cache, slot state set for the request).
  * `step`: one token for every slot: the model at per-row positions, sampling with
    per-row settings, and the row's own stop on EOS / length, all in one program.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxpar.engine.placement import Stage
from jaxpar.engine.slots import SlotState, set_slot
from jaxpar.engine.transfer import Payload, row_spec, take_row
from jaxpar.models.cache import Cache, KVCache
from jaxpar.sampling import row_keys, sample_rows


def _reset_rows(cache: Cache, fresh: jax.Array) -> Cache:
    """Rows starting a new request: length 0 and zero GDN states (stale KV beyond a row's
    length is never read, so it is left alone)."""
    def clear(a):
        return jnp.where(fresh.reshape((-1,) + (1,) * (a.ndim - 1)), jnp.zeros((), a.dtype), a)
    layers = tuple(layer if isinstance(layer, KVCache) else jax.tree.map(clear, layer) for layer in cache.layers)
    return Cache(layers=layers, lengths=jnp.where(fresh, 0, cache.lengths))


class PrefillPrograms:
    def __init__(self, stage: Stage, reorders: tuple, payload_shardings: Payload | None):
        self.stage = stage
        self.reorders = reorders
        self.payload_shardings = payload_shardings
        # Compiled once per chunk length bucket (the shapes of `tokens`).
        self.chunk = jax.jit(self._chunk, donate_argnums=1)
        self.extract = jax.jit(self._extract, out_shardings=payload_shardings)

    def _chunk(self, weights, cache: Cache, tokens, ints, floats):
        """tokens [R, C]; ints [R, 4] = (valid tokens, starts a request, top_k, seed);
        floats [R, 2] = (temperature, top_p). Returns (cache, first tokens [R])."""
        lengths, fresh, top_k, seed = ints[:, 0], ints[:, 1] > 0, ints[:, 2], ints[:, 3].astype(jnp.uint32)
        cache = _reset_rows(cache, fresh)
        positions = cache.lengths[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
        logits, cache = self.stage.model(weights)(tokens, positions, cache, lengths, mode="extend",
                                                  last_only=True)
        keys = row_keys(seed, jnp.zeros_like(lengths))
        first = sample_rows(logits, keys, floats[:, 0], top_k, floats[:, 1])
        return cache, first

    def _extract(self, cache: Cache, first, row, request):
        return Payload(cache=take_row(cache, row, self.reorders),
                       token=jax.lax.dynamic_index_in_dim(first, row, 0, keepdims=True),
                       request=jnp.reshape(request, (1,)).astype(jnp.int32))


class DecodePrograms:
    def __init__(self, stage: Stage, cache_specs: Cache):
        self.stage = stage
        self.cache_specs = cache_specs
        self.step = jax.jit(self._step, donate_argnums=(1, 2))
        self.insert = jax.jit(self._insert, donate_argnums=(0, 1))

    def _step(self, weights, cache: Cache, slots: SlotState):
        """Returns (cache, slots, tokens [S]: the new token of each active slot, else -1)."""
        positions = jnp.where(slots.active, cache.lengths, 0)[:, None]
        logits, new = self.stage.model(weights)(slots.tokens[:, None], positions, cache,
                                                jnp.ones_like(cache.lengths), mode="decode",
                                                last_only=True)
        new = Cache(layers=new.layers, lengths=cache.lengths + slots.active.astype(jnp.int32))
        tokens = sample_rows(logits, row_keys(slots.seed, slots.generated), slots.temperature,
                             slots.top_k, slots.top_p)
        generated = slots.generated + slots.active.astype(jnp.int32)
        stopped = jnp.any(tokens[:, None] == slots.stop_ids, axis=1)
        active = slots.active & ~stopped & (generated < slots.max_new)
        out = jnp.where(slots.active, tokens, -1)
        slots = slots.replace(tokens=jnp.where(slots.active, tokens, slots.tokens), active=active,
                              generated=generated)
        return new, slots, out

    def _insert(self, cache: Cache, slots: SlotState, payload: Payload, slot, ints, floats, stop_ids):
        mesh = self.stage.mesh
        put = functools.partial(_put_row, mesh=mesh, slot=slot)
        layers = tuple(jax.tree.map(lambda a, r, s: put(a, r, s.sharding.spec), layer, row, spec)
                       for layer, row, spec in zip(cache.layers, payload.cache.layers, self.cache_specs.layers))
        lengths = cache.lengths.at[slot].set(payload.cache.lengths[0])
        slots = set_slot(slots, slot, payload.token[0], ints, floats, stop_ids)
        return Cache(layers=layers, lengths=lengths), slots


def _batch_axes(spec: P) -> tuple[str, ...]:
    if not len(spec) or spec[0] is None:
        return ()
    return (spec[0],) if isinstance(spec[0], str) else tuple(spec[0])


def _put_row(cache: jax.Array, row: jax.Array, spec: P, *, mesh, slot) -> jax.Array:
    """cache[slot] = row[0]. When the batch is split (attention DP), each rank writes only
    if the slot is one of its own rows, in `shard_map`, so no rank ever holds more than
    its rows."""
    row = row.astype(cache.dtype)
    axes = _batch_axes(spec)
    if int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64)) == 1:
        return jax.lax.dynamic_update_slice_in_dim(cache, row, slot, 0)

    def local(c, r, slot):
        n = c.shape[0]
        i = slot - jax.lax.axis_index(axes) * n
        mine = (i >= 0) & (i < n)
        i = jnp.clip(i, 0, n - 1)
        old = jax.lax.dynamic_slice_in_dim(c, i, 1, 0)
        return jax.lax.dynamic_update_slice_in_dim(c, jnp.where(mine, r, old), i, 0)

    return jax.shard_map(local, mesh=mesh, in_specs=(spec, row_spec(spec), P()), out_specs=spec,
                         check_vma=False)(cache, row, slot)
