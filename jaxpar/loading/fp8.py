"""FP8 block-scaled checkpoints (HF `quantization_config: {quant_method: fp8, weight_block_size}`).

On disk a quantised tensor `W` (float8_e4m3fn, HF layout `[..., rows, cols]`) has a
companion `W_scale_inv` (float32, `[..., ceil(rows / bn), ceil(cols / bk)]` for
`weight_block_size = [bn, bk]`): `dequantised[..., r, c] = W[..., r, c] * W_scale_inv[...,
r // bn, c // bk]` — HF transformers' (and DeepSeek-V3's) convention. Which tensors are
quantised is read from the checkpoint (those with a `_scale_inv` companion), so a model's
`modules_to_not_convert` (routers, norms, embeddings) needs no list here.

Two ways to load one, both reading each device's slice of a weight and only the scale
blocks covering it:
- `DequantizedSource` wraps a `TensorSource`: quantised tensors read as float32 blocks
  already multiplied by their scales, the `_scale_inv` tensors hidden. Every layout and
  every sharding works (a slice cutting through a scale block reads that block's scale).
- `scale_layout` gives the layout of a parameter's scales beside its own layout, so that a
  model can keep the fp8 weight and its scales as two parameters (`jaxpar.models.fp8`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from jaxpar.loading.layouts import ExpertStack, HFLayout, resolve_name, split_groups
from jaxpar.loading.sources import CheckpointError, Index, TensorSource

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = ("F8_E4M3",)


class UnsupportedQuantizationError(ValueError):
    """A checkpoint's quantization_config names a method or setting jaxpar cannot load."""


@dataclasses.dataclass(frozen=True)
class BlockFP8:
    """`weight_block_size = [rows, cols]` of the HF tensors' last two dims."""

    block: tuple[int, int]
    activation_scheme: str = "dynamic"


def quantization_of(hf_config: dict[str, Any]) -> BlockFP8 | None:
    """The checkpoint's quantisation from its config.json (None for an unquantised one);
    anything but block-scaled fp8 e4m3 with dynamic activations is refused by name."""
    q = hf_config.get("quantization_config") or (hf_config.get("text_config") or {}).get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method != "fp8":
        raise UnsupportedQuantizationError(
            f"quantization method {method!r} is not supported (quantization_config {q}); jaxpar loads "
            "quant_method 'fp8' with weight_block_size (block-scaled float8_e4m3fn weights)")
    block = q.get("weight_block_size")
    if not block or len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise UnsupportedQuantizationError(
            f"fp8 quantization without a 2-d weight_block_size (got {block!r}) is not supported: "
            "jaxpar loads block-scaled fp8 (weight_block_size [rows, cols], e.g. [128, 128])")
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise UnsupportedQuantizationError(f"fp8 format {fmt!r} is not supported (only e4m3)")
    scheme = q.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise UnsupportedQuantizationError(
            f"fp8 activation_scheme {scheme!r} is not supported: jaxpar computes activations in the "
            "model dtype ('dynamic' checkpoints carry no activation scales)")
    return BlockFP8((int(block[0]), int(block[1])), scheme)


def quantised_names(source: TensorSource) -> set[str]:
    """The tensors of `source` that have a `_scale_inv` companion."""
    names = set(source.names())
    return {n for n in names if n + SCALE_SUFFIX in names}


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    return tuple(shape[:-2]) + (math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1]))


def check_scales(source: TensorSource, quant: BlockFP8) -> set[str]:
    """The quantised tensors, after checking their dtype and their scales' shapes."""
    out = quantised_names(source)
    dtype = getattr(source, "dtype", None)
    for name in sorted(out):
        shape = tuple(source.shape(name))
        if len(shape) < 2:
            raise CheckpointError(f"{name} has a {SCALE_SUFFIX} companion but is not a matrix (shape {shape})")
        if dtype is not None and dtype(name) not in FP8_DTYPES:
            raise CheckpointError(f"{name} has a {SCALE_SUFFIX} companion but dtype {dtype(name)}, not float8_e4m3fn")
        want, got = scale_shape(shape, quant.block), tuple(source.shape(name + SCALE_SUFFIX))
        if want != got:
            raise CheckpointError(f"{name + SCALE_SUFFIX} has shape {got}; weight_block_size "
                                  f"{list(quant.block)} and {name} {shape} imply {want}")
    return out


def _bounds(index: Index, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    out = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided read {s} of a quantised tensor")
        out.append((start, stop))
    return out


def dequantised_block(source: TensorSource, name: str, index: Index, block: tuple[int, int]) -> np.ndarray:
    """`W[index] * scales` as float32, reading only the scale blocks that cover the slice."""
    shape = tuple(source.shape(name))
    bounds = _bounds(index, shape)
    w = np.asarray(source.read(name, tuple(slice(a, b) for a, b in bounds)), np.float32)
    (r0, r1), (c0, c1) = bounds[-2:]
    bn, bk = block
    s_index = tuple(slice(a, b) for a, b in bounds[:-2]) + (slice(r0 // bn, -(-r1 // bn)),
                                                              slice(c0 // bk, -(-c1 // bk)))
    s = np.asarray(source.read(name + SCALE_SUFFIX, s_index), np.float32)
    s = np.repeat(np.repeat(s, bn, axis=-2), bk, axis=-1)
    off_r, off_c = r0 - (r0 // bn) * bn, c0 - (c0 // bk) * bk
    return w * s[..., off_r:off_r + (r1 - r0), off_c:off_c + (c1 - c0)]


class DequantizedSource:
    """A TensorSource whose quantised tensors read dequantised (float32) and whose
    `_scale_inv` tensors are hidden: the loader then sees an ordinary checkpoint."""

    def __init__(self, source: TensorSource, quant: BlockFP8):
        self.source, self.quant = source, quant
        self.quantised = check_scales(source, quant)
        hidden = {n + SCALE_SUFFIX for n in self.quantised}
        self._names = [n for n in source.names() if n not in hidden]

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.source.shape(name))

    def dtype(self, name: str) -> str:
        return "F32" if name in self.quantised else self.source.dtype(name)

    def read(self, name: str, index: Index) -> np.ndarray:
        if name in self.quantised:
            return dequantised_block(self.source, name, index, self.quant.block)
        return self.source.read(name, index)


# --------------------------------------------------------------------------- fp8 kept


@dataclasses.dataclass(frozen=True)
class ScaleView:
    """How a kept-fp8 parameter (our shape) and its scales relate: the weight reshaped to
    `view` (the transposed HF view: ours before splitting HF dims) has, along each dim,
    `blocks[d]` consecutive elements per scale entry (1 where the dim is not blocked)."""

    view: tuple[int, ...]
    blocks: tuple[int, ...]
    # For each view dim, the dims of ours it splits into (the leading one carries the split).
    groups: tuple[tuple[int, ...], ...]

    @property
    def scale_shape(self) -> tuple[int, ...]:
        return tuple(-(-n // b) for n, b in zip(self.view, self.blocks))


def _scale_region(region, hf_rank: int, block: tuple[int, int], name: str):
    """A weight's region (axis, start, stop) in scale entries; the start must be on a block."""
    if region is None:
        return None
    axis, start, stop = region
    b = {hf_rank - 2: block[0], hf_rank - 1: block[1]}.get(axis % hf_rank, 1)
    if start % b:
        raise UnsupportedQuantizationError(
            f"{name}: rows [{start}, {stop}) of axis {axis} start inside an fp8 scale block of {b}; "
            "load with dequantize=True")
    return (axis, start // b, -(-stop // b))


def _scale_view(layout: HFLayout, hf_shape: tuple[int, ...], our_shape: tuple[int, ...],
                block: tuple[int, int]) -> ScaleView:
    view = list(hf_shape)
    if layout.region is not None:
        axis, start, stop = layout.region
        view[axis] = stop - start
    perm = layout.perm or tuple(range(len(view)))
    blocks = [1] * len(view)
    blocks[-2], blocks[-1] = block
    tview = tuple(view[p] for p in perm)
    groups = split_groups(tview, our_shape)
    return ScaleView(tview, tuple(blocks[p] for p in perm), tuple(tuple(g) for g in groups))


def scale_layout(layout, base: str, source: TensorSource, our_shape: tuple[int, ...],
                 block: tuple[int, int]) -> tuple[Any, ScaleView]:
    """The layout of a kept-fp8 parameter's scales — the `_scale_inv` tensors read with the
    weight's transposition and region (in scale entries) — and its ScaleView."""
    if isinstance(layout, ExpertStack):
        # Per-expert `experts.{e}.<proj>.weight_scale_inv` or fused `experts.<proj>_scale_inv`.
        stack = ExpertStack(
            per_expert=layout.per_expert + SCALE_SUFFIX, per_layout=layout.per_layout,
            fused=layout.fused + SCALE_SUFFIX,
            fused_layout=dataclasses.replace(layout.fused_layout, region=_scale_region(
                layout.fused_layout.region, 3, block, resolve_name(base, layout.fused))))
        first = layout.names(base, set(source.names()))[0]
        if first == resolve_name(base, layout.fused):
            return stack, _scale_view(layout.fused_layout, tuple(source.shape(first)), our_shape, block)
        view = _scale_view(layout.per_layout, tuple(source.shape(first)), our_shape[1:], block)
        return stack, ScaleView((our_shape[0],) + view.view, (1,) + view.blocks,
                                ((0,),) + tuple(tuple(d + 1 for d in g) for g in view.groups))
    if not isinstance(layout, HFLayout):
        raise UnsupportedQuantizationError(f"{base}: cannot keep fp8 weights of layout {type(layout).__name__}; "
                                           "load with dequantize=True")
    name = resolve_name(base, layout.name)
    scale = dataclasses.replace(layout, name=(layout.name or base.split(".")[-1]) + SCALE_SUFFIX,
                                region=_scale_region(layout.region, len(source.shape(name)), block, name))
    return scale, _scale_view(layout, tuple(source.shape(name)), our_shape, block)
