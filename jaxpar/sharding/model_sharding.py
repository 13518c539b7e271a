"""The resolved sharding of a whole model: `AxisRules` for every block. The rule table
resolves to this (`jaxpar.sharding.resolve.build_sharding`, or `resolve.plain_tp`);
models only read it.

With pipeline parallelism (`pp > 1`) the table resolves to a `PipelineSharding`: one
`ModelSharding` per stage, each on its own mesh (a contiguous slice of the devices) and
holding only its stage's part of the model: its layers (the others are None), the
embedding on the first stage, the final norm and LM head on the last.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jax.sharding import Mesh, NamedSharding

from jaxpar.sharding.axis_rules import AxisRules


@dataclasses.dataclass(frozen=True)
class LayerSharding:
    mixer: AxisRules  # attention / linear attention block
    ffn: AxisRules  # MLP / MoE block
    indexer: AxisRules | None = None  # DeepSeek-V3.2's lightning indexer (its own block)
    proj: AxisRules | None = None  # an MTP layer's input projection (eh_proj / fc) and norms


@dataclasses.dataclass(frozen=True)
class ModelSharding:
    mesh: Mesh
    # One entry per layer of the model; None for a layer another pipeline stage holds.
    layers: tuple[LayerSharding | None, ...]
    # The embedding's and the LM head's rules; None on a pipeline stage without them.
    embed: AxisRules | None
    head: AxisRules | None
    # The resolved per-block plans (jaxpar.sharding.resolve.LayerPlan), for reports.
    plans: tuple[Any, ...] = ()
    table_name: str = "tp"
    # Rules of the table that change nothing for this model (they match no block, or
    # earlier rules take every block they match): one message per rule, for reports.
    rule_warnings: tuple[str, ...] = ()
    # Pipeline stage this sharding is (0 of 1 without pipeline parallelism).
    stage: int = 0
    num_stages: int = 1
    # Multi-token-prediction layers (blocks `mtp.layers.{k}.*`).
    mtp: tuple[LayerSharding, ...] = ()

    def _all_rules(self):
        for layer in self.layers + self.mtp:
            if layer is not None:
                yield from (r for r in (layer.mixer, layer.ffn, layer.indexer, layer.proj) if r is not None)
        if self.embed is not None:
            yield self.embed
        if self.head is not None:
            yield self.head

    @property
    def owned_layers(self) -> tuple[int, ...]:
        """Indices (global) of the layers this sharding holds: all, or a stage's."""
        return tuple(i for i, layer in enumerate(self.layers) if layer is not None)

    @property
    def batch_multiple(self) -> int:
        """Batches are padded to a multiple of this (batch-split attention / dp replicas)."""
        return math.lcm(*(r.size("batch") for r in self._all_rules()))

    @property
    def seq_multiple(self) -> int:
        """Prefill lengths are padded to a multiple of this (sequence parallelism, DCP)."""
        return math.lcm(*(max(r.size("residual_seq"), r.size("cache_seq")) for r in self._all_rules()))

    def rules_for_param(self, path: tuple) -> AxisRules:
        """Which block's rules shard the parameter at `path` (an nnx state path). On the
        last pipeline stage of a model with tied embeddings, `embed_tokens` is the LM
        head's copy of the embedding and follows the head's rules."""
        if path[0] == "layers":
            layer = self.layers[int(path[1])]
            if layer is None:
                raise KeyError(f"layer {path[1]} is not held by pipeline stage {self.stage}")
            return _layer_rules(layer, path[2:])
        if path[0] == "mtp":  # ("mtp", "layers", k, ...)
            return _layer_rules(self.mtp[int(path[2])], path[3:])
        if path[0] == "embed_tokens" and self.embed is not None:
            return self.embed
        # The head, the final norm (replicated under any rules) and a tied copy.
        return self.head if self.head is not None else self.embed

    def activation_sharding(self) -> NamedSharding:
        """The layout of the hidden states [B, T, E] handed to the next pipeline stage:
        rows over the dp replicas, the rest replicated on the stage's devices."""
        return AxisRules(self.mesh, (("residual_batch", ("dp",)),)).sharding(("residual_batch", None, "embed"))


@dataclasses.dataclass(frozen=True)
class PipelineSharding:
    """Pipeline parallelism: `stages[s]` holds layers `ranges[s]` on its own mesh; stage s
    owns devices [s * n, (s + 1) * n) of the device list, n = dp * tp."""

    stages: tuple[ModelSharding, ...]
    partition: tuple[int, ...]  # layers per stage
    plans: tuple[Any, ...] = ()
    table_name: str = "custom"
    rule_warnings: tuple[str, ...] = ()

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def ranges(self) -> tuple[range, ...]:
        starts = [sum(self.partition[:s]) for s in range(len(self.partition))]
        return tuple(range(a, a + n) for a, n in zip(starts, self.partition))

    @property
    def meshes(self) -> tuple[Mesh, ...]:
        return tuple(s.mesh for s in self.stages)

    @property
    def batch_multiple(self) -> int:
        return math.lcm(*(s.batch_multiple for s in self.stages))

    @property
    def seq_multiple(self) -> int:
        return math.lcm(*(s.seq_multiple for s in self.stages))

    def stage_of_layer(self, layer: int) -> int:
        return next(s for s, r in enumerate(self.ranges) if layer in r)

    def describe(self) -> str:
        """"stage 0: layers 0-1 on devices 0-3; stage 1: ..." """
        parts = []
        for s, (stage, r) in enumerate(zip(self.stages, self.ranges)):
            ids = [d.id for d in stage.mesh.devices.flat]
            parts.append(f"stage {s}: layers {r.start}-{r.stop - 1} on devices {min(ids)}-{max(ids)}")
        return "; ".join(parts)


def _layer_rules(layer: LayerSharding, rest: tuple) -> AxisRules:
    """rest: the path inside one decoder layer, e.g. ("self_attn", "indexer", "wk", "weight")."""
    if rest[0] == "mlp":
        return layer.ffn
    if rest[0] == "self_attn" and len(rest) > 1 and rest[1] == "indexer" and layer.indexer is not None:
        return layer.indexer
    if rest[0] in ("self_attn", "linear_attn") or layer.proj is None:
        return layer.mixer
    return layer.proj
