"""Decode slots: which request holds which cache row (host) and each row's state (device).

The decode cache has a fixed number of rows, its slots. With attention data parallelism
the rows are split over the dp ranks in contiguous blocks; a new request goes to the rank
with the most free slots, so each rank decodes its own ragged set of requests and no row
is ever padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class SlotState:
    """Per-slot decode state, kept on the decode devices between steps ([slots] each)."""

    tokens: jax.Array  # int32: the last token, fed to the next step
    active: jax.Array  # bool: still generating (the step stops a row itself on EOS / length)
    generated: jax.Array  # int32: tokens produced so far (the first comes from prefill)
    max_new: jax.Array  # int32
    stop_ids: jax.Array  # int32 [slots, K]: ids that end the row (-1 pads)
    temperature: jax.Array  # float32
    top_k: jax.Array  # int32
    top_p: jax.Array  # float32
    seed: jax.Array  # uint32


def empty_slot_state(slots: int, stop_width: int, sharding) -> SlotState:
    z = lambda dtype: jax.device_put(np.zeros((slots,), dtype), sharding)  # noqa: E731
    return SlotState(tokens=z(np.int32), active=z(np.bool_), generated=z(np.int32), max_new=z(np.int32),
                     stop_ids=jax.device_put(np.full((slots, stop_width), -1, np.int32), sharding),
                     temperature=z(np.float32),
                     top_k=z(np.int32), top_p=jax.device_put(np.ones((slots,), np.float32), sharding),
                     seed=z(np.uint32))


def set_slot(state: SlotState, slot: jax.Array, token: jax.Array, ints: jax.Array,
             floats: jax.Array, stop_ids: jax.Array) -> SlotState:
    """Starts a request in `slot` with its first token (sampled by prefill).

    ints: [max_new, top_k, seed]; floats: [temperature, top_p]; stop_ids [K]. A request
    whose first token already ends it (a stop id, or max_new == 1) starts inactive.
    """
    max_new, top_k, seed = ints[0], ints[1], ints[2].astype(jnp.uint32)
    ended = jnp.any(token == stop_ids) | (max_new <= 1)
    put = lambda a, v: a.at[slot].set(jnp.asarray(v, a.dtype))  # noqa: E731
    return SlotState(tokens=put(state.tokens, token), active=put(state.active, ~ended),
                     generated=put(state.generated, 1), max_new=put(state.max_new, max_new),
                     stop_ids=put(state.stop_ids, stop_ids), temperature=put(state.temperature, floats[0]),
                     top_k=put(state.top_k, top_k), top_p=put(state.top_p, floats[1]),
                     seed=put(state.seed, seed))


class SlotTable:
    """Host bookkeeping of `n` rows split into `shards` contiguous blocks."""

    def __init__(self, n: int, shards: int = 1):
        if n % shards:
            raise ValueError(f"{n} rows cannot be split evenly over {shards} shards")
        self.n, self.shards, self.per_shard = n, shards, n // shards
        self.owner: list[object | None] = [None] * n

    def free_count(self) -> int:
        return self.owner.count(None)

    def used(self) -> list[int]:
        return [i for i, o in enumerate(self.owner) if o is not None]

    def take(self, owner: object) -> int:
        """A free row on the shard with the most free rows (ties: the lowest shard)."""
        free = [sum(o is None for o in self.owner[s * self.per_shard:(s + 1) * self.per_shard])
                for s in range(self.shards)]
        best = max(range(self.shards), key=lambda s: (free[s], -s))
        if free[best] == 0:
            raise RuntimeError("no free row")
        start = best * self.per_shard
        row = start + self.owner[start:start + self.per_shard].index(None)
        self.owner[row] = owner
        return row

    def release(self, row: int) -> None:
        self.owner[row] = None

    def shard_of(self, row: int) -> int:
        return row // self.per_shard
