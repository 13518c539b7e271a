"""Collectives of a compiled SPMD program, counted in the dtype the program moves.

XLA:CPU cannot all-reduce, all-gather or reduce-scatter bfloat16: its `all-reduce-promotion`
and `float-normalization-bf16` passes rewrite them to float32 (convert, collective, convert
back). A bf16 row-parallel matmul on 2 CPU devices thus compiles to an f32 all-reduce, and
counting bytes in the compiled module doubles what a GPU or TPU moves. The module right after
SPMD partitioning still has the program's own dtypes, but not the backend's later rewrites
(combined collectives, removed duplicates). So every collective is read from the compiled
module (what runs: count, kind, group) and its bytes in the dtype it has after SPMD
partitioning: a compiled f32 collective takes a narrower float dtype when the partitioned
module has a collective of the same kind and element count in that dtype.

The partitioned module is written by XLA's own dump (`xla_dump_to` with
`xla_dump_hlo_pass_re=spmd-partitioning`, passed as per-compile options) into a temporary
folder: `compile_with_partitioned_hlo`.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import tempfile
from pathlib import Path
from typing import Any

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "f8e4m3fn": 1, "f8e5m2": 1,
               "s64": 8, "u64": 8, "s32": 4, "u32": 4, "s16": 2, "u16": 2, "s8": 1, "u8": 1,
               "pred": 1}
# Floats a backend may promote to f32 for its collectives.
_NARROW_FLOATS = ("bf16", "f16")

_SHAPE = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
_OP = re.compile(r"^\s*(?:ROOT\s+)?(%?[\w.\-]+)\s*=\s*(\([^()]*\)|\S+)\s+(" + "|".join(COLLECTIVES)
                 + r")(-start)?\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[([\d,]+)\]<=")
_GROUPS_LIST = re.compile(r"replica_groups=\{(\{[\d,]*\})")


class PartitionedHloError(RuntimeError):
    """The SPMD-partitioned module could not be read back from XLA's dump."""


@dataclasses.dataclass(frozen=True)
class CollectiveOp:
    """One collective on one device: `result_bytes` is the size of its result buffer(s) in the
    dtype the program moves; `group` the number of devices taking part."""

    name: str
    kind: str
    result_bytes: int
    group: int
    dtypes: tuple[str, ...] = ()
    compiled_bytes: int = 0  # as the compiled (possibly promoted) module has it
    op_name: str = ""  # jax metadata: where in the program the op comes from


@dataclasses.dataclass
class CollectiveStats:
    count: int = 0
    bytes: int = 0


def _shapes(text: str) -> list[tuple[str, int]]:
    return [(d, math.prod(int(x) for x in dims.split(",") if x)) for d, dims in _SHAPE.findall(text)]


def group_size(line: str, num_devices: int) -> int:
    """Devices per group of a collective, from its `replica_groups` (all three HLO spellings:
    mesh[...] {axes}, iota [groups, size]<=[...], explicit {{...},...}); all devices if absent."""
    m = _GROUPS_MESH.search(line)
    if m:
        sizes = {k.strip().strip("'"): int(v) for k, v in
                 (kv.split("=") for kv in m.group(1).split(",") if "=" in kv)}
        axes = [a.strip().strip("'") for a in m.group(2).split(",") if a.strip()]
        return math.prod(sizes[a] for a in axes) if axes else 1
    m = _GROUPS_IOTA.search(line)
    if m:
        return int(m.group(1).split(",")[-1])
    m = _GROUPS_LIST.search(line)
    if m:
        return len([x for x in m.group(1).strip("{}").split(",") if x])
    return num_devices


def _parse(hlo_text: str, num_devices: int) -> list[tuple[str, str, list[tuple[str, int]], int, str]]:
    """(name, kind, [(dtype, elements) per result buffer], group, op_name) per collective."""
    out = []
    for line in hlo_text.splitlines():
        m = _OP.match(line)
        if not m:
            continue
        name, result, kind, start = m.groups()
        shapes = _shapes(result)
        if start and kind != "all-reduce" and result.startswith("("):
            # async start ops return (operands..., outputs...): keep the outputs
            shapes = shapes[len(shapes) // 2:]
        meta = _OP_NAME.search(line)
        out.append((name, kind, shapes, group_size(line, num_devices), meta.group(1) if meta else ""))
    return out


def collective_ops(hlo_text: str, num_devices: int, partitioned_text: str | None = None) -> list[CollectiveOp]:
    """Every collective of `hlo_text` (a compiled module). With `partitioned_text` (the same
    program right after SPMD partitioning), each f32 result buffer that the partitioned module
    moves in bf16 / f16 is counted in that dtype (see the module docstring)."""
    source: collections.Counter = collections.Counter()
    if partitioned_text is not None:
        for _, kind, shapes, _, _ in _parse(partitioned_text, num_devices):
            for dtype, n in shapes:
                source[(kind, n, dtype)] += 1
    ops = []
    for name, kind, shapes, group, op_name in _parse(hlo_text, num_devices):
        dtypes, nbytes, compiled = [], 0, 0
        for dtype, n in shapes:
            moved = dtype
            if dtype == "f32":
                narrow = next((d for d in _NARROW_FLOATS if source[(kind, n, d)] > 0), None)
                if narrow is not None:
                    moved = narrow
            if source[(kind, n, moved)] > 0:
                source[(kind, n, moved)] -= 1
            dtypes.append(moved)
            nbytes += DTYPE_BYTES[moved] * n
            compiled += DTYPE_BYTES[dtype] * n
        ops.append(CollectiveOp(name, kind, nbytes, group, tuple(dtypes), compiled, op_name))
    return ops


def summarize(ops: list[CollectiveOp]) -> dict[str, CollectiveStats]:
    """{kind: CollectiveStats(count, bytes)} of a list of collectives."""
    stats: dict[str, CollectiveStats] = collections.defaultdict(CollectiveStats)
    for op in ops:
        stats[op.kind].count += 1
        stats[op.kind].bytes += op.result_bytes
    return dict(stats)


def collective_stats(hlo_text: str, partitioned_text: str | None = None,
                     num_devices: int = 1) -> dict[str, CollectiveStats]:
    """Counts collectives in compiled HLO text with the bytes of their results (in the
    partitioned module's dtypes when `partitioned_text` is given)."""
    return summarize(collective_ops(hlo_text, num_devices, partitioned_text))


def ring_wire_bytes(kind: str, result_bytes: float, group: int) -> float:
    """Bytes one device sends for a collective under the ring algorithm.

    all-reduce of S bytes: reduce-scatter + all-gather = 2 (n-1)/n S.
    all-gather with result S: (n-1)/n S.  reduce-scatter with result S (input n S): (n-1) S.
    all-to-all of S: (n-1)/n S.  collective-permute of S: S.
    """
    n = max(int(group), 1)
    if kind == "collective-permute":
        return float(result_bytes)
    if n == 1:
        return 0.0
    if kind == "all-reduce":
        return 2 * (n - 1) / n * result_bytes
    if kind in ("all-gather", "all-to-all"):
        return (n - 1) / n * result_bytes
    if kind == "reduce-scatter":
        return (n - 1) * result_bytes
    raise ValueError(f"unknown collective kind {kind!r}")


def ring_steps(kind: str, group: int) -> int:
    """Sequential message steps of the ring algorithm (each pays the link latency once)."""
    n = max(int(group), 1)
    if kind == "collective-permute":
        return 1
    if n == 1:
        return 0
    return 2 * (n - 1) if kind == "all-reduce" else n - 1


def compile_with_partitioned_hlo(lowered: Any, compiler_options: dict[str, Any] | None = None):
    """Compiles a `jax.stages.Lowered` and returns (compiled, text of the module right after
    SPMD partitioning). A program XLA does not partition (one device) has no such module;
    its compiled text is returned in its place, and it has no collectives."""
    with tempfile.TemporaryDirectory(prefix="jaxpar-hlo-") as tmp:
        options = {"xla_dump_to": tmp, "xla_dump_hlo_pass_re": "^spmd-partitioning$",
                   **(compiler_options or {})}
        compiled = lowered.compile(compiler_options=options)
        files = sorted(Path(tmp).glob("*after_spmd-partitioning*.txt"))
        text = compiled.as_text()
        if not files:
            if any(_OP.match(line) for line in text.splitlines()):
                raise PartitionedHloError(
                    "XLA wrote no module after SPMD partitioning, so the dtypes of the collectives "
                    "cannot be read (a persistent compilation cache hit skips the passes: disable "
                    "jax_compilation_cache_dir for this run)")
            return compiled, text
        if len(files) > 1:
            raise PartitionedHloError(f"XLA dumped {len(files)} partitioned modules for one program: "
                                      f"{[f.name for f in files]}")
        return compiled, files[0].read_text()


def compiled_collectives(lowered: Any, num_devices: int,
                         compiler_options: dict[str, Any] | None = None):
    """(compiled, [CollectiveOp]) of a lowered program, bytes in the dtypes it moves."""
    compiled, partitioned = compile_with_partitioned_hlo(lowered, compiler_options)
    return compiled, collective_ops(compiled.as_text(), num_devices, partitioned)
