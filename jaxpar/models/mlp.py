"""Feed-forward blocks: SwiGLU `down(silu(gate(x)) * up(x))`, or Nemotron-H's ungated
`down(relu(up(x))^2)`.

Phi-3 and GLM-4 store gate and up as one `gate_up_proj` tensor (`[gate | up]` rows); we
read them as two parameters (row regions of it), so tensor parallelism splits each of
them over the ffn dim exactly as for separate tensors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.loading.layouts import HFLayout
from jaxpar.models.linear import Linear, row_parallel_scatter
from jaxpar.models.params import LINEAR
from jaxpar.sharding.axis_rules import AxisRules

ACTIVATIONS = ("silu_gated", "relu2")


def _fused_rows(start: int, stop: int) -> HFLayout:
    return HFLayout(perm=LINEAR.perm, name="../gate_up_proj.weight", region=(0, start, stop))


class MLP(nnx.Module):
    def __init__(self, hidden: int, ffn: int, dtype, rules: AxisRules, *, bias: bool = False,
                 activation: str = "silu_gated", fused_gate_up: bool = False):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown MLP activation {activation!r} (known: {', '.join(ACTIVATIONS)})")
        if fused_gate_up and (bias or activation != "silu_gated"):
            raise ValueError("a fused gate_up_proj is supported for the gated MLP without biases")
        self.gated = activation == "silu_gated"
        if self.gated:
            gate, up = (_fused_rows(0, ffn), _fused_rows(ffn, 2 * ffn)) if fused_gate_up else (LINEAR, LINEAR)
            self.gate_proj = Linear((hidden,), (ffn,), ("embed",), ("ffn",), dtype, bias=bias, hf_layout=gate)
            self.up_proj = Linear((hidden,), (ffn,), ("embed",), ("ffn",), dtype, bias=bias, hf_layout=up)
        else:
            self.gate_proj = None
            self.up_proj = Linear((hidden,), (ffn,), ("embed",), ("ffn",), dtype, bias=bias)
        self.down_proj = Linear((ffn,), (hidden,), ("ffn",), ("embed",), dtype, bias=bias)
        self.rules = rules

    def __call__(self, x: jax.Array, *, scatter_seq: bool = False) -> jax.Array:
        """`scatter_seq`: under sequence parallelism, leave the output split on the
        sequence (reduce-scatter) rather than all-reduced."""
        if self.gated:
            h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = jnp.square(jax.nn.relu(self.up_proj(x)))
        h = self.rules.constrain(h, ("batch", "seq", "ffn"))
        if scatter_seq:
            y = row_parallel_scatter(self.down_proj, h, self.rules, ("batch", "seq", "ffn"))
            if y is not None:
                return y
        return self.down_proj(h)
