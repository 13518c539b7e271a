"""Logical axis names -> physical mesh axes, for one layer.

Parameters, caches and activations declare *logical* axes once (`("embed", "q_heads",
"head_dim")`); a layer's plan decides which physical mesh axes each logical axis is
split over. `AxisRules` is that decision, frozen and hashable so it can live as static
module state inside jit.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MeshAxes = tuple[str, ...]


class ShardingSpecError(ValueError):
    """An array's logical axes cannot be laid out under a block's rules."""


@dataclasses.dataclass(frozen=True)
class AxisRules:
    mesh: Mesh
    # (logical axis, physical mesh axes) pairs; a logical axis not listed is replicated.
    rules: tuple[tuple[str, MeshAxes], ...] = ()

    def axes_for(self, logical: str | None) -> MeshAxes:
        if logical is None:
            return ()
        for name, axes in self.rules:
            if name == logical:
                return axes
        return ()

    def spec(self, logical_axes: Sequence[str | None]) -> P:
        """The PartitionSpec of an array with these logical axes. A mesh axis can split
        only one dimension: two logical axes that map to the same mesh axis are an error
        (dropping one would silently replicate what the plan says to split)."""
        owner: dict[str, str] = {}
        entries = []
        for name in logical_axes:
            axes = self.axes_for(name)
            for a in axes:
                if a in owner:
                    raise ShardingSpecError(
                        f"logical axes {owner[a]!r} and {name!r} both map to mesh axis {a!r} in "
                        f"{tuple(logical_axes)} (rules: {dict(self.rules)})")
                owner[a] = name
            entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return P(*entries)

    def sharding(self, logical_axes: Sequence[str | None]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical_axes))

    def size(self, logical: str) -> int:
        """How many shards the logical axis is split into."""
        n = 1
        for a in self.axes_for(logical):
            n *= self.mesh.shape[a]
        return n

    def constrain(self, x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
        if self.mesh.size == 1:
            return x
        return jax.lax.with_sharding_constraint(x, self.sharding(logical_axes))
