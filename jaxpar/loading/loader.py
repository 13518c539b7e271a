"""Checkpoint tensors -> sharded parameters of an abstract model.

Loading is two steps, shared by `jaxpar.load` and the Orbax converter:

1. `plan_reads` checks every parameter against the checkpoint before any data is read
   (names through the parameter's layout, `jaxpar.loading.layouts`; tensors the model
   would not use; shapes), so a bad checkpoint fails at once, not after minutes.
2. `place_param` builds one parameter with `jax.make_array_from_callback`: each device's
   callback reads only that device's block from the source. Blocks that several devices
   share (replication) are read once. Nothing is held whole on the host beyond one block.

Where each parameter goes comes from the caller: anything with
`rules_for_param(path) -> rules` whose `rules.sharding(logical_axes)` is a `NamedSharding`
(the model's `ModelSharding`); the loader itself knows nothing about meshes or plans.

A pipeline stage's state holds only its layers (and the embedding or the head); the caller
says which layers (`layers=`), and the loader then touches no tensor of another stage, not
even its shape, and does not count those tensors as unused.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpar.config import ModelConfig
from jaxpar.loading.sources import CheckpointError, Index, TensorSource

# Buffers some checkpoints carry that are recomputed, not loaded.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

ParamPath = tuple


class ParamShardings(Protocol):
    """Which sharding each parameter gets (`jaxpar.sharding.model_sharding.ModelSharding`)."""

    def rules_for_param(self, path: ParamPath) -> Any: ...


@dataclasses.dataclass(frozen=True)
class ParamRead:
    """One parameter of the model and the checkpoint tensor(s) it is read from."""

    path: ParamPath  # nnx state path, e.g. ("layers", 0, "self_attn", "q_proj", "weight")
    hf_base: str  # the parameter's default HF name; its layout resolves the real name(s)
    hf_names: tuple[str, ...]
    shape: tuple[int, ...]  # ours
    layout: Any  # HFLayout / ExpertStack (jaxpar.loading.layouts)
    logical_axes: tuple[str | None, ...]
    # The dtype the parameter keeps whatever the model dtype (kept-fp8 weights and their
    # scales, `jaxpar.models.fp8`); None: the model dtype.
    keep_dtype: Any = None

    @property
    def key(self) -> str:
        """"layers/0/self_attn/q_proj/weight"."""
        return "/".join(str(p) for p in self.path)


def hf_name(cfg: ModelConfig, path: ParamPath) -> str:
    if path[0] == "mtp":
        return mtp_hf_name(cfg, path)
    dotted = ".".join(str(p) for p in path)
    return dotted if path[0] == "lm_head" else cfg.weight_prefix + dotted


# Multi-token-prediction parameters whose checkpoint names differ from their paths
# (jaxpar.models.mtp): per layout, our module name -> theirs.
MTP_NAMES = {"deepseek": {"final_norm": "shared_head.norm"},
             "qwen": {"enorm": "pre_fc_norm_embedding", "hnorm": "pre_fc_norm_hidden", "eh_proj": "fc",
                      "final_norm": "norm"}}


def mtp_hf_name(cfg: ModelConfig, path: ParamPath) -> str:
    """("mtp", "layers", k, module, ...) -> DeepSeek's model.layers.{num_layers + k}.* or
    Qwen's mtp.* (whose fc and norms one MTP module shares across its layers)."""
    k, module, rest = int(path[2]), str(path[3]), ".".join(str(p) for p in path[4:])
    names = MTP_NAMES.get(cfg.mtp_layout)
    if names is None:
        raise CheckpointError(f"{cfg.model_type}: unknown multi-token-prediction layout {cfg.mtp_layout!r}")
    if cfg.mtp_layout == "deepseek":
        return f"{cfg.weight_prefix}layers.{cfg.num_layers + k}.{names.get(module, module)}.{rest}"
    if module in names:
        return f"mtp.{names[module]}.{rest}"
    return f"mtp.layers.{k}.{module}.{rest}"


def read_block(source: TensorSource, name: str, layout, our_shape: tuple[int, ...],
               index: Index) -> np.ndarray:
    """Reads `ours[index]` of the parameter whose default HF name is `name`."""
    return layout.read(source, name, our_shape, index)


def layer_of(cfg: ModelConfig, name: str) -> int | None:
    """The layer index of an HF tensor name (`model.layers.3.mlp...` -> 3), or None."""
    m = re.match(re.escape(cfg.weight_prefix) + r"layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def belongs_elsewhere(cfg: ModelConfig, name: str, layers: Sequence[int] | None) -> bool:
    """Whether tensor `name` is another pipeline stage's business when this one holds
    `layers` (None: the whole model): another layer's tensor, or the embedding / final
    norm / LM head (which of those a stage holds, its state says)."""
    if layers is None:
        return False
    layer = layer_of(cfg, name)
    if layer is not None:
        return layer not in layers
    return name in (hf_name(cfg, ("embed_tokens", "weight")), hf_name(cfg, ("norm", "weight")),
                    hf_name(cfg, ("lm_head", "weight")))


def plan_reads(state: nnx.State, cfg: ModelConfig, source: TensorSource, *,
               layers: Sequence[int] | None = None) -> list[ParamRead]:
    """Every parameter of the abstract `state` with the checkpoint tensors it needs, checked
    against `source` (names, unused tensors, shapes) without reading any data. `layers`:
    the layers a pipeline stage's `state` holds (None: the whole model)."""
    available = set(source.names())
    reads = []
    for path, var in nnx.to_flat_state(state):
        base = hf_name(cfg, path)
        reads.append(ParamRead(tuple(path), base, tuple(var.hf_layout.names(base, available)),
                               tuple(var.get_value().shape), var.hf_layout, tuple(var.logical_axes),
                               var.get_value().dtype if getattr(var, "keep_dtype", False) else None))
    missing = [(n, r) for r in reads for n in (r.hf_names or (r.hf_base,)) if n not in available]
    if missing:
        name, r = missing[0]
        more = f" (and {len(missing) - 1} more: {[n for n, _ in missing[1:6]]})" if len(missing) > 1 else ""
        raise CheckpointError(f"tensor {name} (parameter {r.key}) is missing from the checkpoint{more}")
    consumed = {n for r in reads for n in r.hf_names}
    unexpected = sorted(n for n in available - consumed
                        if not n.endswith(IGNORED_SUFFIXES) and not _tied_duplicate(cfg, n)
                        and not n.startswith(cfg.skipped_weight_prefixes)
                        and not belongs_elsewhere(cfg, n, layers))
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} unexpected tensor(s) the model does "
                              f"not use: {unexpected[:8]}")
    for r in reads:
        problem = r.layout.mismatch(source, r.hf_base, r.shape)
        if problem:
            raise CheckpointError(f"tensor {r.hf_names[0]} has shape {tuple(source.shape(r.hf_names[0]))}, "
                                  f"which does not fit parameter {r.key}: the config implies {problem}")
    return reads


def place_param(source: TensorSource, read: ParamRead, sharding: jax.sharding.Sharding,
                dtype) -> jax.Array:
    """One parameter on its sharding, each device's block read from `source` (blocks shared
    by several devices read once) and cast to `dtype`."""
    np_dtype = np.dtype(jnp.dtype(dtype))
    blocks: dict[tuple, np.ndarray] = {}

    def callback(index: Index) -> np.ndarray:
        key = tuple(s.indices(n)[:2] for s, n in zip(index, read.shape))
        if key not in blocks:
            try:
                block = read.layout.read(source, read.hf_base, read.shape, index)
            except CheckpointError:
                raise
            except Exception as e:  # safetensors / GGUF readers raise their own types
                raise CheckpointError(f"cannot read {read.hf_names[0]} for parameter {read.key}: {e}") from e
            blocks[key] = np.ascontiguousarray(block.astype(np_dtype, copy=False))
        return blocks[key]

    return jax.make_array_from_callback(read.shape, sharding, callback)


def param_sharding(shardings: ParamShardings, read: ParamRead) -> jax.sharding.Sharding:
    return shardings.rules_for_param(read.path).sharding(read.logical_axes)


def load_params(state: nnx.State, cfg: ModelConfig, source: TensorSource, sharding: ParamShardings,
                dtype, progress: Callable[[Iterable], Iterable] | None = None, *,
                layers: Sequence[int] | None = None) -> nnx.State:
    """Fills an abstract `state` (from `nnx.eval_shape`) with sharded arrays from `source`;
    `layers`: the layers a pipeline stage's state holds (None: the whole model)."""
    reads = plan_reads(state, cfg, source, layers=layers)
    loaded = [(r.path, place_param(source, r, param_sharding(sharding, r), r.keep_dtype or dtype))
              for r in (progress(reads) if progress else reads)]
    for path, array in loaded:
        set_param(state, path, array)
    return state


def skipped_tensors(cfg: ModelConfig, source: TensorSource) -> list[str]:
    """Checkpoint tensors the config says not to load (vision tower, MTP head)."""
    if not cfg.skipped_weight_prefixes:
        return []
    return [n for n in source.names() if n.startswith(cfg.skipped_weight_prefixes)]


def _tied_duplicate(cfg: ModelConfig, name: str) -> bool:
    return cfg.tie_word_embeddings and name == "lm_head.weight"


def set_param(state: nnx.State, path: Sequence, value: jax.Array) -> None:
    node = state
    for p in path[:-1]:
        node = node[p]
    node[path[-1]].set_value(value)
