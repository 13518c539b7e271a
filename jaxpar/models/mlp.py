"""SwiGLU feed-forward block: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import jax
from flax import nnx

from jaxpar.models.linear import Linear
from jaxpar.sharding.axis_rules import AxisRules


class MLP(nnx.Module):
    def __init__(self, hidden: int, ffn: int, dtype, rules: AxisRules, *, bias: bool = False):
        self.gate_proj = Linear((hidden,), (ffn,), ("embed",), ("ffn",), dtype, bias=bias)
        self.up_proj = Linear((hidden,), (ffn,), ("embed",), ("ffn",), dtype, bias=bias)
        self.down_proj = Linear((ffn,), (hidden,), ("ffn",), ("embed",), dtype, bias=bias)
        self.rules = rules

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        h = self.rules.constrain(h, ("batch", "seq", "ffn"))
        return self.down_proj(h)
