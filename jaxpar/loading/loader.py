"""Checkpoint tensors -> sharded parameters of an abstract model.

For every parameter the loader asks the sharding for its `NamedSharding`, then builds the
array with `jax.make_array_from_callback`: each device's callback reads only that
device's block from the source (through the parameter's layout, `jaxpar.loading.layouts`). Blocks that several
devices share (replication) are read once. Nothing is ever held whole on the host beyond
one tensor's block.
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpar.config import ModelConfig
from jaxpar.loading.sources import CheckpointError, Index, TensorSource
from jaxpar.loading.layouts import HFLayout
from jaxpar.sharding.model_sharding import ModelSharding

# Buffers some checkpoints carry that are recomputed, not loaded.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

ParamPath = tuple


def hf_name(cfg: ModelConfig, path: ParamPath) -> str:
    dotted = ".".join(str(p) for p in path)
    return dotted if path[0] == "lm_head" else cfg.weight_prefix + dotted


def read_block(source: TensorSource, name: str, layout: HFLayout, our_shape: tuple[int, ...],
               index: Index) -> np.ndarray:
    """Reads `ours[index]` of the parameter whose HF tensor is `name`."""
    return layout.read(source, name, our_shape, index)


def load_params(state: nnx.State, cfg: ModelConfig, source: TensorSource, sharding: ModelSharding,
                dtype, progress: Callable[[Iterable], Iterable] | None = None) -> nnx.State:
    """Fills an abstract `state` (from `nnx.eval_shape`) with sharded arrays from `source`."""
    available = set(source.names())
    flat = list(nnx.to_flat_state(state))
    # Check names and shapes of everything before reading any data: a bad checkpoint
    # fails at once, not after minutes of loading.
    bases = [hf_name(cfg, path) for path, _ in flat]
    wanted = [var.hf_layout.names(base, available) for base, (_, var) in zip(bases, flat)]
    missing = [(n, p) for names, (p, _) in zip(wanted, flat) for n in names if n not in available]
    if missing:
        name, path = missing[0]
        more = f" (and {len(missing) - 1} more: {[n for n, _ in missing[1:6]]})" if len(missing) > 1 else ""
        raise CheckpointError(f"tensor {name} (parameter {'/'.join(map(str, path))}) is missing "
                              f"from the checkpoint{more}")
    consumed = {n for names in wanted for n in names}
    unexpected = sorted(n for n in available - consumed
                        if not n.endswith(IGNORED_SUFFIXES) and not _tied_duplicate(cfg, n)
                        and not n.startswith(cfg.skipped_weight_prefixes))
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} unexpected tensor(s) the model does "
                              f"not use: {unexpected[:8]}")
    for base, names, (path, var) in zip(bases, wanted, flat):
        problem = var.hf_layout.mismatch(source, base, tuple(var.get_value().shape))
        if problem:
            raise CheckpointError(f"tensor {names[0]} has shape {source.shape(names[0])}, but the config "
                                  f"implies {problem} (parameter {'/'.join(map(str, path))})")
    items = progress(list(zip(bases, flat))) if progress else list(zip(bases, flat))
    loaded = []
    for base, (path, var) in items:
        named = sharding.rules_for_param(path).sharding(var.logical_axes)
        loaded.append((path, _place(source, base, var.hf_layout, tuple(var.get_value().shape),
                                    named, dtype)))
    for path, array in loaded:
        _set_path(state, path, array)
    return state


def skipped_tensors(cfg: ModelConfig, source: TensorSource) -> list[str]:
    """Checkpoint tensors the config says not to load (vision tower, MTP head)."""
    if not cfg.skipped_weight_prefixes:
        return []
    return [n for n in source.names() if n.startswith(cfg.skipped_weight_prefixes)]


def _tied_duplicate(cfg: ModelConfig, name: str) -> bool:
    return cfg.tie_word_embeddings and name == "lm_head.weight"


def _place(source: TensorSource, name: str, layout: HFLayout, shape: tuple[int, ...],
           sharding: jax.sharding.NamedSharding, dtype) -> jax.Array:
    np_dtype = np.dtype(jnp.dtype(dtype))
    blocks: dict[tuple, np.ndarray] = {}

    def callback(index: Index) -> np.ndarray:
        key = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
        if key not in blocks:  # replicated blocks are read once
            blocks[key] = np.ascontiguousarray(layout.read(source, name, shape, index).astype(np_dtype))
        return blocks[key]

    return jax.make_array_from_callback(shape, sharding, callback)


def _set_path(state: nnx.State, path: ParamPath, value: jax.Array) -> None:
    node = state
    for p in path[:-1]:
        node = node[p]
    node[path[-1]].set_value(value)
