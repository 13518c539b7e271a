"""Matmul FLOPs of a compiled HLO module with loops counted as many times as they run.

XLA's cost analysis counts the body of a `while` loop once, whatever its trip count (a
`lax.scan` of 10 matmuls reports one). jaxpar's Gated DeltaNet prefill scans over chunk
groups, so its compiled FLOPs would be undercounted. This walks the module's call graph and
returns the dot FLOPs XLA missed: sum over loops of (trip count - 1) * the loop's dot FLOPs
(nested loops multiply). Only `dot` instructions are counted (2 * output elements *
contracted elements); element-wise work inside loops stays counted once.
"""

from __future__ import annotations

import dataclasses
import math
import re

_HEADER = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\((.*)\)\s*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\([^()]*\)|[\w]+\[[\d,]*\](?:\{[^}]*\})?|\w+\[\])\s+([\w\-]+)\((.*)$")
_PARAM = re.compile(r"([\w.\-]+):\s*(\w+)\[([\d,]*)\]")
_DIMS = re.compile(r"\w+\[([\d,]*)\]")
_CALLS = re.compile(r"\b(?:calls|to_apply)=%([\w.\-]+)")
_BODY = re.compile(r"\bbody=%([\w.\-]+)")
_COND = re.compile(r"\bcondition=%([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_LHS_CONTRACT = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")


def _dims(text: str) -> tuple[int, ...]:
    m = _DIMS.search(text)
    return tuple(int(x) for x in m.group(1).split(",") if x) if m else ()


@dataclasses.dataclass
class _Computation:
    dots: float = 0.0
    calls: list = dataclasses.field(default_factory=list)  # callee names (counted once)
    loops: list = dataclasses.field(default_factory=list)  # (body, condition, trip count or None)


def _parse(hlo_text: str) -> tuple[dict[str, _Computation], str | None]:
    comps: dict[str, _Computation] = {}
    entry = None
    current: _Computation | None = None
    shapes: dict[str, tuple[int, ...]] = {}
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = comps.setdefault(header.group(1), _Computation())
            shapes = {name: tuple(int(x) for x in dims.split(",") if x)
                      for name, _, dims in _PARAM.findall(header.group(2))}
            if line.startswith("ENTRY"):
                entry = header.group(1)
            continue
        if current is None:
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, result, op, rest = m.groups()
        shapes[name] = _dims(result) if not result.startswith("(") else ()
        if op == "dot":
            lhs = rest.split(",", 1)[0].strip().lstrip("%").rstrip(")")
            contract = _LHS_CONTRACT.search(rest)
            lhs_dims = shapes.get(lhs)
            if contract and lhs_dims is not None:
                k = math.prod(lhs_dims[int(i)] for i in contract.group(1).split(",") if i)
                current.dots += 2.0 * math.prod(shapes[name]) * k
        elif op == "while":
            body, cond, trip = _BODY.search(rest), _COND.search(rest), _TRIP.search(rest)
            current.loops.append((body.group(1) if body else None, cond.group(1) if cond else None,
                                  int(trip.group(1)) if trip else None))
        else:
            current.calls.extend(_CALLS.findall(rest))
    return comps, entry


def loop_dot_flops(hlo_text: str) -> tuple[float, int, int]:
    """(dot FLOPs XLA's cost analysis leaves out, loops with a known trip count > 1,
    loops of unknown trip count) of a compiled module."""
    comps, entry = _parse(hlo_text)
    memo: dict[tuple[str, bool], float] = {}
    stats = {"loops": 0, "unknown": 0}

    def dots(name: str | None, full: bool) -> float:
        """Dot FLOPs of a computation: `full` runs loops their trip count, else once."""
        if name is None or name not in comps:
            return 0.0
        key = (name, full)
        if key in memo:
            return memo[key]
        c = comps[name]
        total = c.dots + sum(dots(callee, full) for callee in c.calls)
        for body, cond, trip in c.loops:
            runs = (trip or 1) if full else 1
            total += runs * (dots(body, full) + dots(cond, full))
        memo[key] = total
        return total

    for c in comps.values():
        for _, _, trip in c.loops:
            if trip is None:
                stats["unknown"] += 1
            elif trip > 1:
                stats["loops"] += 1
    if entry is None:
        return 0.0, 0, 0
    return dots(entry, True) - dots(entry, False), stats["loops"], stats["unknown"]
