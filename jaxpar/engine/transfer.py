"""Moving a prefilled request from the prefill layout to the decode layout.

A request leaves prefill as a *payload*: its cache row (attention KV, GDN conv and
recurrent states, its length), its first token and its index. The payload is produced on
the prefill devices already in the decode layout's order and then copied with
`jax.device_put` onto the decode shardings:

* KV under decode context parallelism (DCP, n ranks) is stored round-robin: position p
  lives on rank p % n at local slot p // n, so in the global array index g holds position
  `(g % (S/n)) * n + g // (S/n)`. Going from one n to another is a fixed permutation of
  the sequence axis, applied while extracting the row (no collective beyond what XLA
  needs to gather the row on the prefill side).
* Heads (KV heads, GDN key-head groups) are split or replicated by the shardings alone:
  `device_put` onto the decode sharding splits a replicated GDN state by key-head groups.

Within one process the copy goes straight onto the decode shardings (disjoint devices or
not). Across two `jax.distributed` processes JAX copies shard to shard between shardings
that differ only in their devices, so the payload is first laid out in the decode
sharding on a mirror mesh of the prefill devices (same shape and axis names as the decode
mesh), and the decode process posts a matching receive. This needs JAX's cross-host
transfer server on CPU (the `jax_cross_host_transfer_socket_address` option, set before
the backend starts). Small control messages (which request a payload is, its first token,
the final results) go through the key-value store of the `jax.distributed` coordination
service: it has no deadline, whereas a collective (or a receive posted long before its
send) times out if the other process is busy for long, as prefill and decode are.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpar.engine.errors import EngineError
from jaxpar.models.cache import Cache, KVCache
from jaxpar.models.mla import MLACache


@struct.dataclass
class Payload:
    cache: Cache  # one row (batch 1), KV in the decode layout's sequence order
    token: jax.Array  # [1] int32: the first generated token
    request: jax.Array  # [1] int32: the request's index


def kv_order(n_dcp: int, length: int) -> np.ndarray:
    """The position held at each global sequence index of a KV cache split over n_dcp ranks."""
    per = length // n_dcp
    g = np.arange(length)
    return (g % per) * n_dcp + g // per


def reorder_index(n_src: int, n_dst: int, length: int) -> np.ndarray | None:
    """Indices that take a row stored for n_src DCP ranks to the order of n_dst ranks
    (None when the orders agree)."""
    if n_src == n_dst:
        return None
    where_src = np.argsort(kv_order(n_src, length))  # position -> global index in the source
    return where_src[kv_order(n_dst, length)].astype(np.int32)


def row_spec(spec: P) -> P:
    """A cache leaf's spec for one row: the batch axis unsplit, the rest as in the cache."""
    return P(None, *tuple(spec)[1:]) if len(spec) else P()


def payload_shardings(cache: Cache, mesh: Mesh) -> Payload:
    """Shardings of a payload for a cache laid out as `cache` (ShapeDtypeStructs), on `mesh`
    (the cache's own mesh, or a mirror of it on other devices)."""
    row = jax.tree.map(lambda s: NamedSharding(mesh, row_spec(s.sharding.spec)), cache)
    replicated = NamedSharding(mesh, P())
    return Payload(cache=row, token=replicated, request=replicated)


def payload_shapes(cache: Cache) -> Payload:
    one = lambda s: jax.ShapeDtypeStruct((1,) + s.shape[1:], s.dtype)  # noqa: E731
    scalar = jax.ShapeDtypeStruct((1,), np.int32)
    return Payload(cache=jax.tree.map(one, cache), token=scalar, request=scalar)


def mirror_mesh(mesh: Mesh, devices) -> Mesh:
    """`mesh`'s shape and axis names over other devices."""
    devices = list(devices)
    if len(devices) != mesh.size:
        raise EngineError(f"a cross-process transfer copies shard to shard, so prefill needs as many "
                          f"devices as decode: {len(devices)} prefill vs {mesh.size} decode devices")
    return Mesh(np.array(devices, dtype=object).reshape(mesh.devices.shape), mesh.axis_names,
                axis_types=tuple(mesh.axis_types) if hasattr(mesh, "axis_types") else None)


def kv_reorders(prefill_sharding, decode_sharding, layer_kinds, length: int) -> tuple:
    """Per layer: the sequence permutation from the prefill to the decode KV layout (None:
    same order, or not an attention layer)."""
    out = []
    for i, is_attention in enumerate(layer_kinds):
        if not is_attention:
            out.append(None)
            continue
        n_src = prefill_sharding.layers[i].mixer.size("cache_seq") if prefill_sharding is not None else 1
        n_dst = decode_sharding.layers[i].mixer.size("cache_seq")
        out.append(reorder_index(n_src, n_dst, length))
    return tuple(out)


def take_row(cache: Cache, row: jax.Array, reorders: tuple) -> Cache:
    """One row of a cache (inside a program), KV permuted by `reorders` (see kv_reorders)."""
    layers = []
    for layer, perm in zip(cache.layers, reorders):
        one = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, row, 0, keepdims=True), layer)
        if perm is not None and isinstance(one, KVCache):  # slots reordered, scales with them
            one = jax.tree.map(lambda a: a[:, perm], one)
        elif perm is not None and isinstance(one, MLACache):  # latent slots as KV slots; index keys by position
            one = one.replace(latent=one.latent[:, perm], k_rope=one.k_rope[:, perm])
        layers.append(one)
    return Cache(layers=tuple(layers), lengths=jax.lax.dynamic_index_in_dim(cache.lengths, row, 0, keepdims=True))


class LocalLink:
    """Prefill and decode in one process: a plain `device_put` onto the decode shardings."""

    def __init__(self, target: Payload):
        self.target = target

    def send(self, payload: Payload) -> Payload:
        return jax.device_put(payload, self.target)


class Channel:
    """Small JSON messages between the processes of one engine, by name, through the
    coordination service's key-value store (JAX's own client: there is no public API)."""

    def __init__(self, prefix: str):
        from jax._src import distributed

        self.client = distributed.global_state.client
        if self.client is None:
            raise EngineError("a two-process engine needs jax.distributed.initialize(...) in both processes")
        self.prefix = prefix

    def put(self, name: str, message) -> None:
        self.client.key_value_set(f"{self.prefix}/{name}", json.dumps(message))

    def poll(self, name: str):
        """The message, or None while it has not been put."""
        try:
            raw = self.client.key_value_try_get(f"{self.prefix}/{name}")
        except Exception as e:  # the client reports a missing key as an error
            if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
                return None
            raise
        return json.loads(raw)

    def wait(self, name: str, timeout_s: float = 24 * 3600):
        return json.loads(self.client.blocking_key_value_get(f"{self.prefix}/{name}", int(timeout_s * 1000)))


class SendLink:
    """The prefill process's end: payloads (already in the mirror shardings) go out in
    order; message k's note (request, first token, times) follows once its first token
    is known, and only then does the decode process post the matching receive."""

    def __init__(self, target: Payload, channel: Channel):
        self.target = target
        self.channel = channel
        self.sent = 0

    def send(self, payload: Payload) -> int:
        jax.device_put(payload, self.target)
        self.sent += 1
        return self.sent - 1

    def note(self, k: int, message: dict) -> None:
        self.channel.put(f"payload/{k}", message)


class ReceiveLink:
    """The decode process's end: receives are posted in the order payloads were sent, each
    once the sender's note for it has arrived."""

    def __init__(self, source: Payload, shapes: Payload, target: Payload, channel: Channel):
        self.channel = channel
        # Arrays on the other process's devices, standing for what it sends: no data here
        # (JAX asks a replicated array's callback once even with no local device).
        self.placeholder = jax.tree.map(
            lambda s, sh: jax.make_array_from_callback(s.shape, sh, lambda i: np.zeros(s.shape, s.dtype)[i],
                                                       dtype=s.dtype), shapes, source)
        self.target = target
        self.posted = 0

    def post(self) -> tuple[Payload, dict] | None:
        """A receive for the next payload once its note is there (arrays that become
        ready when the payload has arrived, and the note), else None."""
        note = self.channel.poll(f"payload/{self.posted}")
        if note is None:
            return None
        self.posted += 1
        return jax.device_put(self.placeholder, self.target), note


def handshake(send: bool, source_mesh: Mesh, target_mesh: Mesh, channel: Channel) -> None:
    """One tiny transfer that opens the connection before any payload (a receive is posted
    only once the sender has sent, so it never waits out a deadline). Turns JAX's error
    about a missing transfer server into one naming the option to set."""
    src = NamedSharding(source_mesh, P())
    dst = NamedSharding(target_mesh, P())
    try:
        if send:
            x = jax.make_array_from_callback((1,), src, lambda i: np.ones((1,), np.int32)[i], dtype=np.int32)
            jax.device_put(x, dst)
            channel.put("hello", 1)
        else:
            channel.wait("hello")
            x = jax.make_array_from_callback((1,), src, lambda i: np.zeros((1,), np.int32)[i], dtype=np.int32)
            y = jax.device_put(x, dst)
            if int(np.asarray(y.addressable_data(0))[0]) != 1:
                raise EngineError("the prefill-to-decode handshake delivered wrong data")
    except ValueError as e:
        if isinstance(e, EngineError):
            raise
        raise EngineError(
            "prefill and decode are in different processes, and this JAX backend cannot copy "
            "arrays between processes without its transfer server: set "
            "jax.config.update('jax_cross_host_transfer_socket_address', 'HOST:PORT') (and "
            "'jax_cross_host_transport_addresses', e.g. '127.0.0.1:0') before "
            f"jax.distributed.initialize in every process ({e})") from e
