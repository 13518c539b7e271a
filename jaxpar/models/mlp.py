"""SwiGLU feed-forward block: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import jax
from flax import nnx

from jaxpar.models.linear import Linear, row_parallel_scatter
from jaxpar.sharding.axis_rules import AxisRules


class MLP(nnx.Module):
    def __init__(self, hidden: int, ffn: int, dtype, rules: AxisRules, *, bias: bool = False):
        self.gate_proj = Linear((hidden,), (ffn,), ("embed",), ("ffn",), dtype, bias=bias)
        self.up_proj = Linear((hidden,), (ffn,), ("embed",), ("ffn",), dtype, bias=bias)
        self.down_proj = Linear((ffn,), (hidden,), ("ffn",), ("embed",), dtype, bias=bias)
        self.rules = rules

    def __call__(self, x: jax.Array, *, scatter_seq: bool = False) -> jax.Array:
        """`scatter_seq`: under sequence parallelism, leave the output split on the
        sequence (reduce-scatter) rather than all-reduced."""
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        h = self.rules.constrain(h, ("batch", "seq", "ffn"))
        if scatter_seq:
            y = row_parallel_scatter(self.down_proj, h, self.rules, ("batch", "seq", "ffn"))
            if y is not None:
                return y
        return self.down_proj(h)
