"""Gated DeltaNet mixer (Qwen3-Next / Qwen3.5 linear attention).

Every tensor is laid out grouped by key head (`lin_k_heads`), so splitting that axis over
tp ranks is the GDN tensor-parallel contract (docs/ARCHITECTURE.md, 5.6) with no communication
inside the mixer: each key head owns its q/k conv channels, its `r = Hv / Hk` value heads
(their v / z channels, b, a, A_log, dt_bias) and their rows of out_proj.

Qwen3-Next stores `in_proj_qkvz` / `in_proj_ba` already grouped per key head; Qwen3.5
stores `in_proj_qkv` as [q | k | v] segments plus `in_proj_z` / `in_proj_b` / `in_proj_a`,
which we read as separate parameters (regions of the fused tensor). The depthwise conv
weight [q | k | v channels, 1, K] is read as three parameters the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from jaxpar.config import ModelConfig
from jaxpar.kernels_pallas import dispatch
from jaxpar.loading.layouts import HFLayout
from jaxpar.models.linear import Linear
from jaxpar.models.norms import rms_normalise
from jaxpar.models.options import RuntimeOptions
from jaxpar.models.params import LINEAR, param
from jaxpar.sharding.axis_rules import AxisRules

CONV_AXES = ("batch", None, "lin_k_heads", None)
STATE_AXES = ("batch", "lin_v_heads", None, None)


@struct.dataclass
class GDNCache:
    """Conv inputs of the last K-1 steps ([B, K-1, Hk, channels] per q / k / v segment)
    and the recurrent state [B, Hv, Dk, Dv]."""

    conv_q: jax.Array
    conv_k: jax.Array
    conv_v: jax.Array
    recurrent: jax.Array


def gdn_cache_shapes(cfg: ModelConfig, batch: int, conv_dtype, state_dtype):
    hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv, k = cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_conv_kernel
    r = hv // hk
    return GDNCache(conv_q=((batch, k - 1, hk, dk), conv_dtype, CONV_AXES),
                    conv_k=((batch, k - 1, hk, dk), conv_dtype, CONV_AXES),
                    conv_v=((batch, k - 1, hk, r * dv), conv_dtype, CONV_AXES),
                    recurrent=((batch, hv, dk, dv), state_dtype, STATE_AXES))


def _conv_layout(start: int, stop: int) -> HFLayout:
    return HFLayout(name="conv1d.weight", region=(0, start, stop))


def _fused_rows(name: str, start: int, stop: int) -> HFLayout:
    return HFLayout(perm=LINEAR.perm, name=f"../{name}.weight", region=(0, start, stop))


class GatedRMSNorm(nnx.Module):
    """weight * rmsnorm(x) * silu(z), over the value head dim (weight replicated)."""

    def __init__(self, dim: int, eps: float, dtype):
        self.weight = param((dim,), (None,), dtype)
        self.eps = eps

    def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
        normed = self.weight[...].astype(x.dtype) * rms_normalise(x, self.eps).astype(x.dtype)
        return (normed * jax.nn.silu(z.astype(jnp.float32))).astype(x.dtype)


def causal_conv(x: jax.Array, state: jax.Array, weight: jax.Array, lengths: jax.Array,
                bias: jax.Array | None = None):
    """Depthwise causal conv1d (+ bias) + SiLU continuing from `state`.

    x: [B, T, Hk, C]; state: [B, K-1, Hk, C] (the previous K-1 inputs); weight [Hk, C, K];
    bias [Hk, C] or None; lengths [B]: valid new inputs per row. Returns
    (out [B, T, Hk, C], new state = the last K-1 valid inputs).
    """
    k = weight.shape[-1]
    full = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # [B, K-1+T, Hk, C]
    t = x.shape[1]
    w = weight.astype(jnp.float32)
    out = sum(full[:, j: j + t].astype(jnp.float32) * w[..., j] for j in range(k))
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    idx = lengths[:, None] + jnp.arange(k - 1)[None, :]  # positions of the last K-1 valid inputs
    new_state = jnp.take_along_axis(full, idx[:, :, None, None], axis=1)
    return jax.nn.silu(out).astype(x.dtype), new_state


class GatedDeltaNet(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rules: AxisRules, options: RuntimeOptions):
        e = cfg.hidden_size
        hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        dk, dv, k = cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_conv_kernel
        r = hv // hk
        self.dims = (hk, hv, dk, dv, r)
        self.kernel_size = k
        heads = ("lin_k_heads", None)
        self.layout = cfg.linear_projection_layout
        if self.layout == "grouped":
            self.in_proj_qkvz = Linear((e,), (hk, 2 * dk + 2 * r * dv), ("embed",), heads, dtype)
            self.in_proj_ba = Linear((e,), (hk, 2 * r), ("embed",), heads, dtype)
        elif self.layout == "split":
            kd = hk * dk
            self.in_proj_q = Linear((e,), (hk, dk), ("embed",), heads, dtype,
                                    hf_layout=_fused_rows("in_proj_qkv", 0, kd))
            self.in_proj_k = Linear((e,), (hk, dk), ("embed",), heads, dtype,
                                    hf_layout=_fused_rows("in_proj_qkv", kd, 2 * kd))
            self.in_proj_v = Linear((e,), (hk, r * dv), ("embed",), heads, dtype,
                                    hf_layout=_fused_rows("in_proj_qkv", 2 * kd, 2 * kd + hv * dv))
            self.in_proj_z = Linear((e,), (hk, r * dv), ("embed",), heads, dtype)
            self.in_proj_b = Linear((e,), (hk, r), ("embed",), heads, dtype)
            self.in_proj_a = Linear((e,), (hk, r), ("embed",), heads, dtype)
        else:
            raise ValueError(f"unknown linear_projection_layout {self.layout!r}")
        kd = hk * dk
        self.conv_q = param((hk, dk, k), heads + (None,), dtype, _conv_layout(0, kd))
        self.conv_k = param((hk, dk, k), heads + (None,), dtype, _conv_layout(kd, 2 * kd))
        self.conv_v = param((hk, r * dv, k), heads + (None,), dtype, _conv_layout(2 * kd, 2 * kd + hv * dv))
        self.A_log = param((hk, r), heads, dtype)
        self.dt_bias = param((hk, r), heads, dtype)
        self.norm = GatedRMSNorm(dv, cfg.rms_norm_eps, dtype)
        self.out_proj = Linear((hk, r * dv), (e,), heads, ("embed",), dtype)
        self.rules = rules
        self.options = options

    def _project(self, x):
        hk, hv, dk, dv, r = self.dims
        if self.layout == "grouped":
            qkvz = self.in_proj_qkvz(x)
            q, k = qkvz[..., :dk], qkvz[..., dk: 2 * dk]
            v, z = qkvz[..., 2 * dk: 2 * dk + r * dv], qkvz[..., 2 * dk + r * dv:]
            ba = self.in_proj_ba(x)
            b, a = ba[..., :r], ba[..., r:]
        else:
            q, k, v = self.in_proj_q(x), self.in_proj_k(x), self.in_proj_v(x)
            z, b, a = self.in_proj_z(x), self.in_proj_b(x), self.in_proj_a(x)
        return q, k, v, z, b, a

    def _chunked(self, q, k, v, g, beta, state, lengths, impl):
        """The chunked rule per shard of key heads, in `shard_map`: heads are independent,
        so nothing crosses devices (under plain GSPMD the kernel's chunking reshapes lose
        the head split and XLA all-gathers q, k, v). The sequence is whole on every rank."""
        rules = self.rules

        def run(q, k, v, g, beta, lengths, *state):
            return dispatch.gated_delta_rule_chunked(q, k, v, g, beta, initial_state=state[0] if state else None,
                                                     lengths=lengths, impl=impl)

        if rules.mesh.size == 1:
            return run(q, k, v, g, beta, lengths, *(() if state is None else (state,)))
        qk = rules.spec(("batch", None, "lin_k_heads", None))
        vs = rules.spec(("batch", None, "lin_v_heads", None))
        gb = rules.spec(("batch", None, "lin_v_heads"))
        st = rules.spec(STATE_AXES)
        states = () if state is None else (state,)
        return jax.shard_map(run, mesh=rules.mesh, in_specs=(qk, qk, vs, gb, gb, rules.spec(("batch",)))
                             + (st,) * len(states), out_specs=(vs, st), check_vma=False)(q, k, v, g, beta, lengths, *states)

    def __call__(self, x: jax.Array, cache: GDNCache | None, lengths: jax.Array, *,
                 mode: str) -> tuple[jax.Array, GDNCache | None]:
        """x: [B, T, E]. mode "prefill" / "extend" continue from `cache` (zeros when
        fresh) over `lengths` valid tokens per row; "decode" takes one token."""
        hk, hv, dk, dv, r = self.dims
        bsz, t = x.shape[:2]
        x = self.rules.constrain(x, ("batch", "seq", "embed"))
        q, k, v, z, b, a = self._project(x)
        if cache is None:
            zeros = lambda c: jnp.zeros((bsz, self.kernel_size - 1, hk, c), x.dtype)  # noqa: E731
            conv_states = (zeros(dk), zeros(dk), zeros(r * dv))
            state = None
        else:
            conv_states = (cache.conv_q, cache.conv_k, cache.conv_v)
            state = cache.recurrent.astype(jnp.float32)
        with jax.named_scope("conv1d"):
            conv_lengths = jnp.ones_like(lengths) if mode == "decode" else lengths
            (q, cq), (k, ck), (v, cv) = (causal_conv(u, s, w[...], conv_lengths) for u, s, w in
                                         zip((q, k, v), conv_states, (self.conv_q, self.conv_k, self.conv_v)))
        beta = jax.nn.sigmoid(b.astype(jnp.float32)).reshape(bsz, t, hv)
        g = (-jnp.exp(self.A_log[...].astype(jnp.float32))
             * jax.nn.softplus(a.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)))
        g = g.reshape(bsz, t, hv)
        v = v.reshape(bsz, t, hv, dv)
        impl = self.options.impl_for
        with jax.named_scope("gated_delta_rule"):
            if mode == "decode":
                if state is None:
                    raise ValueError("decode needs a cache")
                o, state = dispatch.gated_delta_rule_decode(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0],
                                                            state, impl=impl("gated_delta_rule_decode"))
                o = o[:, None]
            else:
                o, state = self._chunked(q, k, v, g, beta, state, lengths, impl("gated_delta_rule_chunked"))
        o = self.norm(o.astype(x.dtype), z.reshape(bsz, t, hv, dv))
        out = self.out_proj(o.reshape(bsz, t, hk, r * dv))
        out = self.rules.constrain(out, ("batch", "seq", "embed"))
        if cache is None:
            return out, None
        new = GDNCache(conv_q=cq.astype(cache.conv_q.dtype), conv_k=ck.astype(cache.conv_k.dtype),
                       conv_v=cv.astype(cache.conv_v.dtype), recurrent=state.astype(cache.recurrent.dtype))
        c = self.rules.constrain
        return out, GDNCache(conv_q=c(new.conv_q, CONV_AXES), conv_k=c(new.conv_k, CONV_AXES),
                             conv_v=c(new.conv_v, CONV_AXES), recurrent=c(new.recurrent, STATE_AXES))
