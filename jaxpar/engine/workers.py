"""The two sides of the engine: a prefill worker (prompt chunks into a small cache of its
own, then one payload per finished prompt) and a decode worker (the slot cache, inserts,
and steps kept one ahead of the host)."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np

from jaxpar.engine.placement import Stage
from jaxpar.engine.programs import DecodePrograms, PrefillPrograms
from jaxpar.engine.requests import Request
from jaxpar.engine.slots import SlotTable, empty_slot_state
from jaxpar.engine.transfer import Payload

MIN_CHUNK = 16


def chunk_buckets(max_chunk: int, multiple: int) -> list[int]:
    """Chunk lengths that get a compiled program: powers of two from MIN_CHUNK up to
    `max_chunk` (and `max_chunk` itself), rounded up to `multiple`."""
    sizes, n = set(), MIN_CHUNK
    while n < max_chunk:
        sizes.add(n)
        n *= 2
    sizes.add(max_chunk)
    return sorted({-(-s // multiple) * multiple for s in sizes})


def zeros(shapes) -> object:
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype, device=a.sharding), shapes)


class PrefillWorker:
    def __init__(self, stage: Stage, programs: PrefillPrograms, rows: int, length: int, max_chunk: int):
        self.stage = stage
        self.programs = programs
        self.table = SlotTable(rows, stage.sharding.batch_multiple)
        self.cache = zeros(stage.cache_shapes(rows, length))
        self.buckets = chunk_buckets(max_chunk, stage.sharding.seq_multiple)
        self.fresh: set[int] = set()
        self.last = None  # the last chunk's output: the next chunk waits for it

    def has_free_row(self) -> bool:
        return self.table.free_count() > 0

    @property
    def active(self) -> int:
        return len(self.table.used())

    def admit(self, req: Request, now: float) -> None:
        req.prefill_row = self.table.take(req)
        req.prefill_start = now
        self.fresh.add(req.prefill_row)

    def idle(self) -> bool:
        """No chunk is running (so another may be dispatched)."""
        return self.last is None or self.last.is_ready()

    def wait(self) -> None:
        if self.last is not None:
            self.last.block_until_ready()

    def bucket(self, n: int) -> int:
        return next((b for b in self.buckets if b >= n), self.buckets[-1])

    def dispatch(self) -> list[tuple[Request, Payload, jax.Array]]:
        """Runs one chunk for every busy row; returns (request, payload, first tokens) of
        the requests whose prompt is now complete (their rows are free again)."""
        rows = self.table.used()
        if not rows:
            return []
        n_rows = self.table.n
        c = self.bucket(max(len(self.table.owner[r].prompt) - self.table.owner[r].prefilled for r in rows))
        tokens = np.zeros((n_rows, c), np.int32)
        ints = np.zeros((n_rows, 4), np.int32)
        floats = np.tile(np.array([0.0, 1.0], np.float32), (n_rows, 1))
        done = []
        for r in rows:
            req: Request = self.table.owner[r]
            take = req.prompt[req.prefilled: req.prefilled + c]
            tokens[r, : len(take)] = take
            ints[r] = [len(take), r in self.fresh, *req.ints()[1:]]
            floats[r] = req.floats()
            req.prefilled += len(take)
            if req.prefilled == len(req.prompt):
                done.append(req)
        self.fresh.clear()
        self.cache, first = self.programs.chunk(self.stage.weights, self.cache, tokens, ints, floats)
        self.last = first
        out = []
        for req in done:
            payload = self.programs.extract(self.cache, first, np.int32(req.prefill_row), np.int32(req.index))
            out.append((req, payload, first))
            self.table.release(req.prefill_row)
        return out


class DecodeWorker:
    def __init__(self, stage: Stage, programs: DecodePrograms, slots: int, length: int, stop_width: int):
        self.stage = stage
        self.programs = programs
        self.table = SlotTable(slots, stage.sharding.batch_multiple)
        self.cache = zeros(stage.cache_shapes(slots, length))
        replicated = jax.sharding.NamedSharding(stage.mesh, jax.sharding.PartitionSpec())
        self.stop_width = stop_width
        self.state = empty_slot_state(slots, stop_width, replicated)
        # Dispatched steps not yet read: (step number, tokens, which request held each slot then).
        self.pending: collections.deque = collections.deque()
        self.steps = 0

    def has_free_slot(self) -> bool:
        return self.table.free_count() > 0

    @property
    def busy(self) -> bool:
        return bool(self.table.used())

    def insert(self, req: Request, payload: Payload) -> None:
        req.slot = self.table.take(req)
        self.cache, self.state = self.programs.insert(
            self.cache, self.state, payload, np.int32(req.slot), np.array(req.ints(), np.int32),
            np.array(req.floats(), np.float32), np.array(req.stop_row(self.stop_width), np.int32))

    def release(self, req: Request) -> None:
        if req.slot is not None and self.table.owner[req.slot] is req:
            self.table.release(req.slot)

    def dispatch(self) -> None:
        self.cache, self.state, out = self.programs.step(self.stage.weights, self.cache, self.state)
        self.pending.append((self.steps, out, list(self.table.owner)))
        self.steps += 1

    def read_oldest(self) -> list[tuple[Request, int]]:
        """Blocks for the oldest dispatched step; returns (request, token) per live slot."""
        _, out, owners = self.pending.popleft()
        host = np.asarray(out)
        return [(owners[s], int(t)) for s, t in enumerate(host) if t >= 0 and owners[s] is not None]
