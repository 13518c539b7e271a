"""Keeping an FP8 block-scaled checkpoint's weights in fp8 (`jaxpar.load(..., dequantize=False)`).

`keep_fp8` runs on the abstract model (inside `nnx.eval_shape`) before loading: every
projection whose checkpoint tensor(s) are quantised (they have `_scale_inv` companions;
`jaxpar.loading.fp8`) gets its weight declared float8_e4m3fn and a float32 scale parameter
`<attr>_scale_inv` beside it, loaded by the same loader through the scales' own layout, so
each device reads only its slice of the weight and the scale blocks of that slice. The
module then multiplies them in its matmul (`jaxpar.models.fp8_weights`).

Sharding: a scale entry covers a block of the weight, so every split of a blocked dim must
fall on block boundaries (e.g. q_proj's rows split over tp: heads*head_dim / tp must be a
multiple of the block's rows). A split that cuts through a block raises
`ScaleBlockSplitError`; `dequantize=True` has no such limit.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxpar.config import ModelConfig
from jaxpar.loading.fp8 import (BlockFP8, UnsupportedQuantizationError, check_scales,
                                scale_layout)
from jaxpar.loading.loader import ParamShardings, hf_name
from jaxpar.loading.sources import CheckpointError, TensorSource
from jaxpar.models.linear import Linear
from jaxpar.models.moe import Experts

# The modules whose weights can be kept in fp8, and their weight attributes.
QUANTISABLE = ((Linear, ("weight",)), (Experts, ("gate_proj", "up_proj", "down_proj")))


class ScaleBlockSplitError(UnsupportedQuantizationError):
    """A sharding splits a kept-fp8 weight through the middle of a scale block."""


def _check_split(key: str, var, view, rules) -> None:
    for d, group in enumerate(view.groups):
        sizes = [rules.size(var.logical_axes[i]) for i in group]
        if any(s > 1 for s in sizes[1:]):
            raise ScaleBlockSplitError(
                f"{key}: its dims {group} (one dim of the checkpoint tensor) are split on an inner "
                "dim, which fp8 scale blocks cannot follow; load with dequantize=True")
        ways = sizes[0] if sizes else 1
        if ways > 1 and view.blocks[d] > 1 and (view.view[d] // ways) % view.blocks[d]:
            raise ScaleBlockSplitError(
                f"{key}: a {ways}-way split of its {view.view[d]}-long dim gives {view.view[d] // ways} per "
                f"device, which cuts through its fp8 scale blocks of {view.blocks[d]} (weight_block_size): "
                f"a split must divide its {-(-view.view[d] // view.blocks[d])} block(s); choose another plan "
                "or load with dequantize=True")


def _declare(node, ppath: tuple, attr: str, layout, view, shardings: ParamShardings) -> None:
    """Makes `node.<attr>` a float8_e4m3fn parameter with float32 scales `<attr>_scale_inv`
    (read through `layout`), after checking the split of its blocks."""
    var = getattr(node, attr)
    _check_split("/".join(map(str, ppath)), var, view, shardings.rules_for_param(ppath))
    shape = tuple(var.get_value().shape)
    axes = tuple(var.logical_axes[g[0]] if g else None for g in view.groups)
    setattr(node, attr, nnx.Param(jnp.zeros(shape, jnp.float8_e4m3fn), logical_axes=var.logical_axes,
                                  hf_layout=var.hf_layout, keep_dtype=True))
    setattr(node, attr + "_scale_inv", nnx.Param(jnp.zeros(view.scale_shape, jnp.float32),
                                                 logical_axes=axes, hf_layout=layout, keep_dtype=True))
    setattr(node, attr + "_fp8_view", view)


def _quantisable(model: nnx.Module):
    return [(tuple(path), node, attrs) for path, node in nnx.iter_graph(model)
            for kind, attrs in QUANTISABLE if isinstance(node, kind)]


def keep_fp8(model: nnx.Module, cfg: ModelConfig, quant: BlockFP8, source: TensorSource,
             shardings: ParamShardings) -> nnx.Module:
    """Declares the quantised weights of the abstract `model` fp8, with their scales."""
    quantised = check_scales(source, quant)
    available = set(source.names())
    claimed: set[str] = set()
    for path, node, attrs in _quantisable(model):
        for attr in attrs:
            var = getattr(node, attr)
            ppath = path + (attr,)
            base = hf_name(cfg, ppath)
            names = var.hf_layout.names(base, available)
            q = [n for n in names if n in quantised]
            if not q:
                continue
            if len(q) != len(names):
                raise CheckpointError(f"{base}: tensors {sorted(set(names) - set(q))} are not fp8 but "
                                      f"{q[:2]} are; one parameter cannot mix them")
            claimed.update(q)
            layout, view = scale_layout(var.hf_layout, base, source, tuple(var.get_value().shape), quant.block)
            _declare(node, ppath, attr, layout, view, shardings)
    # A pipeline stage's model holds its own layers only: other stages claim theirs.
    others = tuple(f"{cfg.weight_prefix}layers.{i}." for i in range(cfg.num_layers)
                   if i not in getattr(shardings, "owned_layers", range(cfg.num_layers)))
    left = sorted(n for n in quantised - claimed if not n.startswith(others))
    if left:
        raise UnsupportedQuantizationError(
            f"{len(left)} fp8 tensor(s) belong to parameters that cannot stay fp8 (only projections "
            f"and experts can): {left[:4]}; load with dequantize=True")
    return model


def keep_fp8_like(model: nnx.Module, loaded: nnx.Module, shardings: ParamShardings) -> nnx.Module:
    """Declares fp8 in the abstract `model` wherever the already loaded `loaded` (the same
    architecture, another sharding) keeps fp8 weights: for placing a loaded model elsewhere."""
    ref = {tuple(path): node for path, node in nnx.iter_graph(loaded)}
    for path, node, attrs in _quantisable(model):
        for attr in attrs:
            view = getattr(ref.get(path), attr + "_fp8_view", None)
            if view is not None:
                layout = getattr(ref[path], attr + "_scale_inv").hf_layout
                _declare(node, path + (attr,), attr, layout, view, shardings)
    return model
