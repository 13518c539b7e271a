"""Roofline time of one step on one device, and of a pipeline of such steps.

    compute = FLOPs / peak FLOP/s (the step's dtype)
    memory  = bytes / HBM bandwidth
    comm    = sum over collectives of  ring_wire_bytes / interconnect bandwidth
                                     + ring_steps * link latency
    time    = max(compute, memory) + comm

Compute and memory overlap (a kernel is bound by the slower of the two); the collectives of
tensor / sequence / expert parallelism sit on the critical path between layers, so they
add. Ring algorithm: an all-reduce of S bytes over n devices sends 2 (n-1)/n S per device
in 2 (n-1) steps; all-gather / reduce-scatter half of that (see
`jaxpar.sharding.collectives.ring_wire_bytes`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

from jaxpar.experiment.hardware import HardwareProfile
from jaxpar.sharding.collectives import ring_steps, ring_wire_bytes

FORMULA = ("time = max(FLOPs / peak, bytes / HBM bandwidth) + sum over collectives "
           "(ring wire bytes / interconnect bandwidth + ring steps * link latency)")
PIPELINE_FORMULA = ("TTFT = sum_s t_s / n + (n - 1) * max_s t_s / n + (P - 1) * p2p(chunk); "
                    "TPOT = sum_s t_s + (P - 1) * p2p(rows); t_s = stage s's roofline time for the "
                    "whole step, n = prompt chunks, P = stages, p2p(x) = x * hidden * itemsize / "
                    "interconnect bandwidth + link latency")


@dataclasses.dataclass(frozen=True)
class Roofline:
    compute_s: float
    memory_s: float
    comm_s: float

    @property
    def time_s(self) -> float:
        return max(self.compute_s, self.memory_s) + self.comm_s

    @property
    def bound(self) -> str:
        """What dominates: compute, memory or communication."""
        top = max(self.compute_s, self.memory_s)
        if self.comm_s > top:
            return "comm"
        return "compute" if self.compute_s >= self.memory_s else "memory"

    def to_json(self) -> dict[str, float | str]:
        return {"compute_s": self.compute_s, "memory_s": self.memory_s, "comm_s": self.comm_s,
                "time_s": self.time_s, "bound": self.bound}


def comm_time(collectives: Iterable[tuple[str, float, int]], hw: HardwareProfile) -> float:
    """Seconds for collectives given as (kind, result bytes, group size)."""
    total = 0.0
    for kind, nbytes, group in collectives:
        total += ring_wire_bytes(kind, nbytes, group) / hw.interconnect_bandwidth
        total += ring_steps(kind, group) * hw.link_latency
    return total


def roofline(flops: float, nbytes: float, collectives: Iterable[tuple[str, float, int]],
             hw: HardwareProfile, dtype: str) -> Roofline:
    return Roofline(compute_s=flops / hw.flops(dtype), memory_s=nbytes / hw.hbm_bandwidth,
                    comm_s=comm_time(collectives, hw))


def p2p_time(nbytes: float, hw: HardwareProfile) -> float:
    """One activation send between neighbouring pipeline stages."""
    return nbytes / hw.interconnect_bandwidth + hw.link_latency


def pipeline_prefill(stage_times: Sequence[float], chunks: int, send_s: float) -> float:
    """TTFT of a prompt cut into `chunks` equal chunks flowing through the stages: the first
    chunk crosses every stage (and the P-1 links), the others leave at the pace of the slowest
    stage. A chunk costs 1/chunks of its stage's whole-prompt time (exact for the linear terms;
    attention's quadratic term is averaged over the chunks)."""
    if chunks < 1 or not stage_times:
        raise ValueError(f"need >= 1 chunk and >= 1 stage, got {chunks} and {len(stage_times)}")
    n = chunks
    return sum(stage_times) / n + (n - 1) * max(stage_times) / n + (len(stage_times) - 1) * send_s


def pipeline_decode(stage_times: Sequence[float], send_s: float) -> float:
    """TPOT of one batch: its token crosses every stage in turn."""
    return sum(stage_times) + (len(stage_times) - 1) * send_s


def chunks_for(prompt: int, chunk: int | None) -> int:
    return 1 if not chunk else math.ceil(prompt / chunk)
