"""jaxpar parameters back into the Hugging Face tensors they were read from.

The loader's layouts (`jaxpar.loading.layouts`) are gathers: a parameter is
reshape(transpose(hf[region], perm)) of one HF tensor (`HFLayout`), or a stack of such
(`ExpertStack`). `Assembler` scatters parameters back: directly for those two layouts, and
for any other layout by letting it gather *positions* instead of values (a stand-in source
whose tensors hold their own flat indices) and scattering through those. A tensor fed by
several parameters (regions of a fused tensor) is complete once every element is covered.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

import numpy as np

from jaxpar.checkpoint.atomic import ConversionError
from jaxpar.loading.layouts import ExpertStack, HFLayout, resolve_name

_HFLAYOUT_FIELDS = {"perm", "name", "region"}


def _plain(layout: Any) -> bool:
    """An HFLayout using only the fields this module knows how to invert."""
    if not isinstance(layout, HFLayout):
        return False
    default = HFLayout()
    return all(f.name in _HFLAYOUT_FIELDS or getattr(layout, f.name) == getattr(default, f.name)
               for f in dataclasses.fields(layout))


class _PositionSource:
    """A TensorSource whose tensors hold their global flat positions (for generic inverses)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], names: Iterable[str]):
        self.shapes = shapes
        self.offsets: dict[str, int] = {}
        total = 0
        for n in names:
            self.offsets[n] = total
            total += math.prod(shapes[n])
        self.dtype = np.int32 if total < 2**31 else np.int64

    def names(self) -> list[str]:
        return list(self.shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def read(self, name: str, index) -> np.ndarray:
        shape = self.shapes[name]
        positions = np.arange(math.prod(shape), dtype=self.dtype).reshape(shape)[index]
        return positions + self.dtype(self.offsets[name])


class Assembler:
    """Collects parameters (in our layout) into HF tensors of the given shapes."""

    def __init__(self, hf_shapes: dict[str, tuple[int, ...]], dtype):
        self.shapes = {k: tuple(v) for k, v in hf_shapes.items()}
        self.dtype = np.dtype(dtype)
        self._buffers: dict[str, np.ndarray] = {}
        self._masks: dict[str, np.ndarray] = {}
        self._full: set[str] = set()

    def names_of(self, base: str, layout: Any) -> list[str]:
        return list(layout.names(base, set(self.shapes)))

    # --- scatter

    def add(self, base: str, layout: Any, ours: np.ndarray) -> None:
        """Scatters one parameter (its whole array, our layout) into its HF tensor(s)."""
        if _plain(layout):
            self._add_hf_layout(base, layout, ours)
        elif isinstance(layout, ExpertStack) and _plain(layout.fused_layout) and _plain(layout.per_layout):
            if resolve_name(base, layout.fused) in self.shapes:
                self._add_hf_layout(base, dataclasses.replace(layout.fused_layout, name=layout.fused), ours)
            else:
                for e in range(ours.shape[0]):
                    self._add_hf_layout(base, dataclasses.replace(layout.per_layout,
                                                                  name=layout.per_expert.format(e=e)), ours[e])
        else:
            self._add_generic(base, layout, ours)

    def _buffer(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in self._buffers or name in self._full:
            previous = self._buffers.get(name)
            buf = np.empty(self.shapes[name], self.dtype)
            mask = np.zeros(self.shapes[name], bool)
            if previous is not None:  # an earlier parameter already covered it whole
                buf[...] = previous
                mask[...] = True
                self._full.discard(name)
            self._buffers[name], self._masks[name] = buf, mask
        return self._buffers[name], self._masks[name]

    def _shape(self, name: str) -> tuple[int, ...]:
        try:
            return self.shapes[name]
        except KeyError:
            raise ConversionError(f"HF tensor {name} is not listed in the checkpoint's manifest") from None

    def _add_hf_layout(self, base: str, layout: HFLayout, ours: np.ndarray) -> None:
        name = resolve_name(base, layout.name)
        hf_shape = self._shape(name)
        view_shape = list(hf_shape)
        index = [slice(None)] * len(hf_shape)
        if layout.region is not None:
            axis, start, stop = layout.region
            view_shape[axis] = stop - start
            index[axis] = slice(start, stop)
        perm = layout.perm or tuple(range(len(view_shape)))
        transposed = tuple(view_shape[p] for p in perm)
        if math.prod(transposed) != ours.size:
            raise ConversionError(f"parameter for {name}: {ours.shape} does not fit the HF view {tuple(view_shape)}")
        view = np.transpose(ours.reshape(transposed), np.argsort(perm))
        if layout.region is None and name not in self._buffers:
            self._buffers[name] = view.astype(self.dtype, copy=False)
            self._full.add(name)
            return
        buf, mask = self._buffer(name)
        buf[tuple(index)] = view
        mask[tuple(index)] = True

    def _add_generic(self, base: str, layout: Any, ours: np.ndarray) -> None:
        names = self.names_of(base, layout)
        for n in names:
            self._shape(n)
        positions = _PositionSource(self.shapes, names)
        try:
            where = layout.read(positions, base, tuple(ours.shape), tuple(slice(None) for _ in ours.shape))
        except Exception as e:
            raise ConversionError(f"cannot invert the layout {layout!r} of {base}: {e}") from e
        where = np.asarray(where).reshape(-1)
        values = ours.reshape(-1)
        for n in names:
            lo, size = positions.offsets[n], math.prod(self.shapes[n])
            sel = (where >= lo) & (where < lo + size)
            buf, mask = self._buffer(n)
            buf.reshape(-1)[where[sel] - lo] = values[sel]
            mask.reshape(-1)[where[sel] - lo] = True

    # --- completed tensors

    def pop(self, name: str) -> np.ndarray:
        """The finished HF tensor (every element written), removed from the assembler."""
        if name not in self._buffers:
            raise ConversionError(f"no parameter holds HF tensor {name}")
        if name not in self._full and not self._masks[name].all():
            missing = int((~self._masks[name]).sum())
            raise ConversionError(f"HF tensor {name}: {missing} of {self._masks[name].size} elements are "
                                  "not held by any parameter")
        self._full.discard(name)
        self._masks.pop(name, None)
        return np.ascontiguousarray(self._buffers.pop(name))
