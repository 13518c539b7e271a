"""How a jaxpar parameter relates to the Hugging Face tensor(s) it is loaded from.

Each parameter declares a layout. The loader asks it which HF tensors it consumes, checks
their shapes before reading anything, and reads any block `ours[index]` — a device's
slice — touching only the matching part of the file.

- `HFLayout`: ours = reshape(transpose(hf[region], perm), our_shape), where the reshape
  only splits HF dims into consecutive dims of ours (e.g. q_proj `[heads*hd, hidden]` ->
  `[hidden, heads, hd]`), and `region` optionally selects a contiguous range of one HF
  axis (e.g. the q rows of Qwen3.5's fused `in_proj_qkv`).
- `ExpertStack`: `[experts, ...]` stacked from per-expert tensors
  (`experts.{e}.gate_proj.weight`) or read from one fused tensor
  (`experts.gate_up_proj`), whichever the checkpoint holds.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import numpy as np

Index = tuple[slice, ...]


class TensorReader(Protocol):
    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, index: Index) -> np.ndarray: ...


def resolve_name(base: str, name: str | None) -> str:
    """`base` is the parameter's default HF name (its nnx path, dotted). `name` replaces
    the parameter's own component; each leading '../' climbs one more module."""
    if name is None:
        return base
    parts = base.split(".")[:-1]
    while name.startswith("../"):
        parts, name = parts[:-1], name[3:]
    return ".".join(parts + [name])


def split_groups(transposed_shape: tuple[int, ...], our_shape: tuple[int, ...]) -> list[list[int]]:
    """Which consecutive dims of ours each (transposed) HF dim splits into. A size-1 HF dim
    with no size-1 counterpart maps to no dim of ours."""
    groups, d = [], 0
    for size in transposed_shape:
        if size == 1 and (d >= len(our_shape) or our_shape[d] != 1):
            groups.append([])
            continue
        group, prod = [], 1
        while prod < size or not group:
            if d >= len(our_shape):
                break
            group.append(d)
            prod *= our_shape[d]
            d += 1
        if prod != size:
            raise ValueError(f"cannot reshape {transposed_shape} into {our_shape}")
        groups.append(group)
    while d < len(our_shape) and our_shape[d] == 1 and groups:
        groups[-1].append(d)
        d += 1
    if d != len(our_shape):
        raise ValueError(f"cannot reshape {transposed_shape} into {our_shape}")
    return groups


@dataclasses.dataclass(frozen=True)
class HFLayout:
    perm: tuple[int, ...] | None = None
    # HF tensor name relative to the parameter (see resolve_name); None = the param's path.
    name: str | None = None
    # (axis, start, stop) of the HF tensor that this parameter is.
    region: tuple[int, int, int] | None = None

    def names(self, base: str, available: set[str]) -> list[str]:
        return [resolve_name(base, self.name)]

    def _view_shape(self, hf_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.region is None:
            return hf_shape
        axis, start, stop = self.region
        return hf_shape[:axis] + (stop - start,) + hf_shape[axis + 1:]

    def mismatch(self, source: TensorReader, base: str, our_shape: tuple[int, ...]) -> str | None:
        """None if the HF tensor fits; otherwise what was expected, in words."""
        name = resolve_name(base, self.name)
        hf_shape = source.shape(name)
        perm = self.perm or tuple(range(len(hf_shape)))
        what = (f"a tensor whose {'transpose ' + str(self.perm) + ' ' if self.perm else ''}"
                f"{'rows ' + str(self.region[1:]) + ' of axis ' + str(self.region[0]) + ' ' if self.region else ''}"
                f"split into jaxpar's shape {our_shape}")
        if self.region is not None and (self.region[0] >= len(hf_shape) or self.region[2] > hf_shape[self.region[0]]):
            return what
        view = self._view_shape(hf_shape)
        if sorted(perm) != list(range(len(view))) or math.prod(view) != math.prod(our_shape):
            return what
        try:
            split_groups(tuple(view[p] for p in perm), our_shape)
        except ValueError:
            return what
        return None

    def read(self, source: TensorReader, base: str, our_shape: tuple[int, ...], index: Index) -> np.ndarray:
        name = resolve_name(base, self.name)
        hf_shape = source.shape(name)
        view = self._view_shape(hf_shape)
        perm = self.perm or tuple(range(len(view)))
        groups = split_groups(tuple(view[p] for p in perm), our_shape)
        bounds = [index[d].indices(our_shape[d])[:2] for d in range(len(our_shape))]
        hf_index: list[slice] = [slice(None)] * len(view)
        block_shape, inner = [], []
        for t_dim, group in enumerate(groups):
            if not group:  # a size-1 HF dim that ours drops
                continue
            lead, rest = group[0], group[1:]
            stride = math.prod(our_shape[d] for d in rest)
            s0, e0 = bounds[lead]
            hf_index[perm[t_dim]] = slice(s0 * stride, e0 * stride)
            block_shape += [e0 - s0] + [our_shape[d] for d in rest]
            inner += [slice(None)] + [slice(*bounds[d]) for d in rest]
        if self.region is not None:
            axis, start, _ = self.region
            s = hf_index[axis]
            lo, hi = (s.start or 0), (view[axis] if s.stop is None else s.stop)
            hf_index[axis] = slice(start + lo, start + hi)
        block = source.read(name, tuple(hf_index))
        block = np.transpose(block, perm) if self.perm else block
        return block.reshape(block_shape)[tuple(inner)]


@dataclasses.dataclass(frozen=True)
class ExpertStack:
    """Ours `[experts, ...]`: per-expert tensors (`per_expert` with `{e}`, each through
    `per_layout`) or one fused tensor (`fused`, through `fused_layout`)."""

    per_expert: str
    per_layout: HFLayout
    fused: str
    fused_layout: HFLayout

    def _fused_present(self, base: str, available: set[str]) -> bool:
        return resolve_name(base, self.fused) in available

    def names(self, base: str, available: set[str]) -> list[str]:
        if self._fused_present(base, available):
            return [resolve_name(base, self.fused)]
        n = self._num_experts(base, available)
        return [resolve_name(base, self.per_expert.format(e=e)) for e in range(n)]

    def _num_experts(self, base: str, available: set[str]) -> int:
        n = 0
        while resolve_name(base, self.per_expert.format(e=n)) in available:
            n += 1
        return n

    def _fused(self, base: str) -> HFLayout:
        return dataclasses.replace(self.fused_layout, name=self.fused)

    def _expert(self, base: str, e: int) -> HFLayout:
        return dataclasses.replace(self.per_layout, name=self.per_expert.format(e=e))

    def mismatch(self, source, base: str, our_shape: tuple[int, ...]) -> str | None:
        available = set(source.names())
        if self._fused_present(base, available):
            return self._fused(base).mismatch(source, base, our_shape)
        n = self._num_experts(base, available)
        if n != our_shape[0]:
            return f"{our_shape[0]} experts (found {n} per-expert tensors)"
        return self._expert(base, 0).mismatch(source, base, our_shape[1:])

    def read(self, source, base: str, our_shape: tuple[int, ...], index: Index) -> np.ndarray:
        if self._fused_present(base, set(source.names())):
            return self._fused(base).read(source, base, our_shape, index)
        lo, hi = index[0].indices(our_shape[0])[:2]
        return np.stack([self._expert(base, e).read(source, base, our_shape[1:], index[1:])
                         for e in range(lo, hi)])
