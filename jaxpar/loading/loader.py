"""Checkpoint tensors -> sharded parameters of an abstract model.

For every parameter the loader asks the sharding for its `NamedSharding`, then builds the
array with `jax.make_array_from_callback`: each device's callback reads only that
device's block from the source (through the parameter's `HFLayout`). Blocks that several
devices share (replication) are read once. Nothing is ever held whole on the host beyond
one tensor's block.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpar.config import ModelConfig
from jaxpar.loading.sources import CheckpointError, Index, TensorSource
from jaxpar.models.params import HFLayout
from jaxpar.sharding.model_sharding import ModelSharding

# Buffers some checkpoints carry that are recomputed, not loaded.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

ParamPath = tuple


def hf_name(cfg: ModelConfig, path: ParamPath) -> str:
    dotted = ".".join(str(p) for p in path)
    return dotted if path[0] == "lm_head" else cfg.weight_prefix + dotted


def _groups(transposed_shape: tuple[int, ...], our_shape: tuple[int, ...]) -> list[list[int]]:
    """Which consecutive dims of ours each (transposed) HF dim splits into."""
    groups, d = [], 0
    for size in transposed_shape:
        group, prod = [], 1
        while prod < size or (not group):
            if d >= len(our_shape):
                break
            group.append(d)
            prod *= our_shape[d]
            d += 1
        # Trailing size-1 dims of ours join the last group.
        if prod != size:
            raise ValueError(f"cannot reshape {transposed_shape} into {our_shape}")
        groups.append(group)
    while d < len(our_shape) and our_shape[d] == 1:
        groups[-1].append(d)
        d += 1
    if d != len(our_shape):
        raise ValueError(f"cannot reshape {transposed_shape} into {our_shape}")
    return groups


def read_block(source: TensorSource, name: str, layout: HFLayout, our_shape: tuple[int, ...],
               index: Index) -> np.ndarray:
    """Reads `ours[index]` where ours = reshape(transpose(hf, perm), our_shape)."""
    hf_shape = source.shape(name)
    perm = layout.perm or tuple(range(len(hf_shape)))
    transposed = tuple(hf_shape[p] for p in perm)
    groups = _groups(transposed, our_shape)
    bounds = [index[d].indices(our_shape[d])[:2] for d in range(len(our_shape))]
    hf_index: list[slice] = [slice(None)] * len(hf_shape)
    block_shape, inner = [], []
    for t_dim, group in enumerate(groups):
        lead, rest = group[0], group[1:]
        stride = math.prod(our_shape[d] for d in rest)
        s0, e0 = bounds[lead]
        hf_index[perm[t_dim]] = slice(s0 * stride, e0 * stride)
        block_shape += [e0 - s0] + [our_shape[d] for d in rest]
        inner += [slice(None)] + [slice(*bounds[d]) for d in rest]
    block = source.read(name, tuple(hf_index))
    block = np.transpose(block, perm) if layout.perm else block
    return block.reshape(block_shape)[tuple(inner)]


def load_params(state: nnx.State, cfg: ModelConfig, source: TensorSource, sharding: ModelSharding,
                dtype, progress: Callable[[Iterable], Iterable] | None = None) -> nnx.State:
    """Fills an abstract `state` (from `nnx.eval_shape`) with sharded arrays from `source`."""
    available = set(source.names())
    flat = list(nnx.to_flat_state(state))
    consumed: set[str] = set()
    items = progress(flat) if progress else flat
    loaded = []
    for path, var in items:
        name = hf_name(cfg, path)
        if name not in available:
            raise CheckpointError(f"tensor {name} (parameter {'/'.join(map(str, path))}) is missing "
                                  "from the checkpoint")
        our_shape = tuple(var.get_value().shape)
        hf_shape = source.shape(name)
        if math.prod(hf_shape) != math.prod(our_shape):
            raise CheckpointError(f"tensor {name} has shape {hf_shape}; the config implies "
                                  f"{_hf_expected(var.hf_layout, our_shape)}")
        consumed.add(name)
        named = sharding.rules_for_param(path).sharding(var.logical_axes)
        loaded.append((path, _place(source, name, var.hf_layout, our_shape, named, dtype)))
    unexpected = sorted(n for n in available - consumed
                        if not n.endswith(IGNORED_SUFFIXES) and not _tied_duplicate(cfg, n))
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} unexpected tensor(s) the model does "
                              f"not use: {unexpected[:8]}")
    for path, array in loaded:
        _set_path(state, path, array)
    return state


def _tied_duplicate(cfg: ModelConfig, name: str) -> bool:
    return cfg.tie_word_embeddings and name == "lm_head.weight"


def _hf_expected(layout: HFLayout, our_shape: tuple[int, ...]) -> str:
    return f"{math.prod(our_shape)} elements (jaxpar shape {our_shape})"


def _place(source: TensorSource, name: str, layout: HFLayout, shape: tuple[int, ...],
           sharding: jax.sharding.NamedSharding, dtype) -> jax.Array:
    np_dtype = np.dtype(jnp.dtype(dtype))
    blocks: dict[tuple, np.ndarray] = {}

    def callback(index: Index) -> np.ndarray:
        key = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
        if key not in blocks:  # replicated blocks are read once
            blocks[key] = np.ascontiguousarray(read_block(source, name, layout, shape, index).astype(np_dtype))
        return blocks[key]

    return jax.make_array_from_callback(shape, sharding, callback)


def _set_path(state: nnx.State, path: ParamPath, value: jax.Array) -> None:
    node = state
    for p in path[:-1]:
        node = node[p]
    node[path[-1]].set_value(value)
