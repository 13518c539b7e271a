"""Physical mesh axes from the logical groups the plans use.

Every plan splits the `tp` devices into groups (attention: dp x tp x dcp, MoE: ep x tp,
MLP: tp). Each group must be a product of whole mesh axes, so the tp devices are
factored into prime-sized axes, each plan's groups are assigned disjoint sets of them,
and neighbouring axes that no group ever separates are merged back. Plain TP thus gets a
single `tp` axis; `attn_tp=4, dcp=2` gets axes `attn_tp` (4) and `dcp` (2).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jaxpar.sharding.rules import RuleTableError


def prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out


@dataclasses.dataclass(frozen=True)
class Group:
    """A logical group of one plan: `role` (dp / tp / dcp / ep) of `size` devices."""

    role: str
    size: int
    # Axis name the rule used for this size (e.g. "attn_tp"), to name the mesh axis.
    label: str | None = None


@dataclasses.dataclass(frozen=True)
class MeshLayout:
    mesh: Mesh
    # (plan key, groups) -> physical axes for each group, in the same order.
    tp_axes: tuple[str, ...]
    assignments: dict

    def axes_of(self, groups: tuple[Group, ...]) -> tuple[tuple[str, ...], ...]:
        return self.assignments[groups]


def _assign(primes: list[int], groups: tuple[Group, ...], where: str) -> list[tuple[int, ...]]:
    free = list(range(len(primes)))
    out = []
    for g in groups:
        picked = []
        for p in prime_factors(g.size):
            idx = next((i for i in free if primes[i] == p), None)
            if idx is None:
                raise RuleTableError(f"{where}: the {g.role} group of {g.size} devices does not fit "
                                     f"beside the other groups in the {int(np.prod(primes))} tp devices")
            free.remove(idx)
            picked.append(idx)
        out.append(tuple(sorted(picked)))
    return out


def build_mesh(tp: int, dp: int, plans: Sequence[tuple[str, tuple[Group, ...]]],
               devices: Sequence[jax.Device]) -> MeshLayout:
    """`plans`: (description, groups) for every resolved plan; groups' sizes divide tp."""
    primes = sorted(prime_factors(tp), reverse=True)
    raw = {}
    for where, groups in plans:
        if groups not in raw:
            raw[groups] = (where, _assign(primes, groups, where))
    # Merge neighbouring prime axes that every group takes or leaves together.
    cuts = [0]
    for i in range(1, len(primes)):
        together = all((i - 1 in sel) == (i in sel) for _, sels in raw.values() for sel in sels)
        if not together:
            cuts.append(i)
    blocks = [tuple(range(c, (cuts + [len(primes)])[k + 1])) for k, c in enumerate(cuts)] if primes else []
    sizes = [int(np.prod([primes[i] for i in b])) for b in blocks]
    names = _name_axes(blocks, raw)
    block_of = {i: k for k, b in enumerate(blocks) for i in b}
    assignments = {}
    for groups, (_, sels) in raw.items():
        assignments[groups] = tuple(tuple(names[k] for k in sorted({block_of[i] for i in sel}))
                                    for sel in sels)
    need = dp * tp
    if len(devices) < need:
        raise RuleTableError(f"the rule table needs dp * tp = {dp} * {tp} = {need} devices, "
                             f"but only {len(devices)} are available")
    devs = np.array(list(devices)[:need], dtype=object).reshape([dp] + sizes)
    mesh = Mesh(devs, ("dp", *names), axis_types=(AxisType.Auto,) * (1 + len(names)))
    return MeshLayout(mesh=mesh, tp_axes=tuple(names), assignments=assignments)


def _name_axes(blocks, raw) -> list[str]:
    if len(blocks) == 1:
        return ["tp"]
    names: list[str | None] = [None] * len(blocks)
    block_of = {i: k for k, b in enumerate(blocks) for i in b}
    for groups, (_, sels) in raw.items():
        for g, sel in zip(groups, sels):
            ks = {block_of[i] for i in sel}
            if len(ks) == 1 and g.label and g.label not in names and g.label not in ("tp", "dp"):
                k = ks.pop()
                names[k] = names[k] or g.label
    return [n or f"tp{k}" for k, n in enumerate(names)]
