"""The resolved sharding of a whole model: one `AxisRules` per layer plus the
embedding / head rules. The rule table resolves to this; models only read it."""

from __future__ import annotations

import dataclasses

from jax.sharding import Mesh

from jaxpar.config import ModelConfig
from jaxpar.sharding.axis_rules import AxisRules, MeshAxes, single_device_mesh


@dataclasses.dataclass(frozen=True)
class ModelSharding:
    mesh: Mesh
    layers: tuple[AxisRules, ...]
    # Embedding, final norm and lm_head.
    embed: AxisRules

    @classmethod
    def plain_tp(cls, cfg: ModelConfig, mesh: Mesh | None = None,
                 tp_axes: MeshAxes | None = None) -> "ModelSharding":
        """Every layer tensor-parallel over `tp_axes` (default: all mesh axes)."""
        mesh = mesh or single_device_mesh()
        tp_axes = tuple(mesh.axis_names) if tp_axes is None else tp_axes
        rules = AxisRules(mesh, tp_layer_rules(cfg, mesh, tp_axes))
        embed = AxisRules(mesh, (("vocab", tp_axes),))
        return cls(mesh=mesh, layers=(rules,) * cfg.num_layers, embed=embed)


def tp_layer_rules(cfg: ModelConfig, mesh: Mesh, tp_axes: MeshAxes) -> tuple[tuple[str, MeshAxes], ...]:
    tp = 1
    for a in tp_axes:
        tp *= mesh.shape[a]
    # KV heads fewer than tp ranks are replicated (each rank keeps the KV heads of its q heads).
    kv_axes = tp_axes if cfg.num_kv_heads % tp == 0 else ()
    return (("q_heads", tp_axes), ("kv_heads", kv_axes), ("ffn", tp_axes))
