"""The resolved sharding of a whole model: `AxisRules` for every block. The rule table
resolves to this (`jaxpar.sharding.resolve.build_sharding`, or `resolve.plain_tp`);
models only read it."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jax.sharding import Mesh

from jaxpar.sharding.axis_rules import AxisRules


@dataclasses.dataclass(frozen=True)
class LayerSharding:
    mixer: AxisRules  # attention / linear attention block
    ffn: AxisRules  # MLP / MoE block


@dataclasses.dataclass(frozen=True)
class ModelSharding:
    mesh: Mesh
    layers: tuple[LayerSharding, ...]
    embed: AxisRules
    head: AxisRules
    # The resolved per-block plans (jaxpar.sharding.resolve.LayerPlan), for reports.
    plans: tuple[Any, ...] = ()
    table_name: str = "tp"
    # Rules of the table that change nothing for this model (they match no block, or
    # earlier rules take every block they match): one message per rule, for reports.
    rule_warnings: tuple[str, ...] = ()

    def _all_rules(self):
        for layer in self.layers:
            yield layer.mixer
            yield layer.ffn
        yield self.embed
        yield self.head

    @property
    def batch_multiple(self) -> int:
        """Batches are padded to a multiple of this (batch-split attention / dp replicas)."""
        return math.lcm(*(r.size("batch") for r in self._all_rules()))

    @property
    def seq_multiple(self) -> int:
        """Prefill lengths are padded to a multiple of this (sequence parallelism, DCP)."""
        return math.lcm(*(max(r.size("residual_seq"), r.size("cache_seq")) for r in self._all_rules()))

    def rules_for_param(self, path: tuple) -> AxisRules:
        """Which block's rules shard the parameter at `path` (an nnx state path)."""
        if path[0] == "layers":
            layer = self.layers[int(path[1])]
            return layer.ffn if path[2] == "mlp" else layer.mixer
        return self.head if path[0] == "lm_head" else self.embed
