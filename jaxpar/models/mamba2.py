"""Mamba2 mixer (Nemotron-H's `M` layers).

HF stores `in_proj` as one tensor whose rows are `[z | x | B | C | dt]` (z, x: H heads of
P channels; B, C: G groups of N; dt: H) and the depthwise `conv1d` over the `[x | B | C]`
channels. We read each segment as its own parameter (row regions of the fused tensors),
laid out by head (`ssm_heads`) or by group (`ssm_groups`), so tensor parallelism splits
them by heads with each rank holding whole groups and their heads (docs/ARCHITECTURE.md,
"Mamba2 tensor parallelism"). No communication happens inside the mixer; the
row-parallel `out_proj` reduces.

Per token: conv1d + SiLU over x, B, C (the conv state keeps the last K-1 inputs);
dt = max(softplus(dt + dt_bias), dt_min); A = -exp(A_log); the SSD scan (chunked for
prefill / extend, one step for decode; `jaxpar.kernels_pallas.ssd`) with the D skip;
then y * silu(z), RMS-normalised within each group of heads (HF's grouped gated norm,
norm after gate), times the norm weight; then `out_proj`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from jaxpar.config import ModelConfig
from jaxpar.kernels_pallas import ssd
from jaxpar.loading.layouts import HFLayout
from jaxpar.models.gdn import causal_conv
from jaxpar.models.linear import Linear
from jaxpar.models.norms import rms_normalise
from jaxpar.models.options import RuntimeOptions
from jaxpar.models.params import LINEAR, param
from jaxpar.sharding.axis_rules import AxisRules

HEADS = ("ssm_heads", None)
GROUPS = ("ssm_groups", None)
CONV_X_AXES = ("batch", None, "ssm_heads", None)
CONV_BC_AXES = ("batch", None, "ssm_groups", None)
SSM_AXES = ("batch", "ssm_heads", None, None)


@struct.dataclass
class MambaCache:
    """Conv inputs of the last K-1 steps (x: [B, K-1, H, P]; B, C: [B, K-1, G, N]) and the
    SSM state [B, H, P, N]."""

    conv_x: jax.Array
    conv_B: jax.Array
    conv_C: jax.Array
    ssm: jax.Array


def mamba_cache_shapes(cfg: ModelConfig, batch: int, conv_dtype, state_dtype) -> MambaCache:
    """(shape, dtype, logical axes) of each cache array."""
    h, p, g, n = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.mamba_n_groups, cfg.mamba_state_size
    k = cfg.mamba_conv_kernel
    return MambaCache(conv_x=((batch, k - 1, h, p), conv_dtype, CONV_X_AXES),
                      conv_B=((batch, k - 1, g, n), conv_dtype, CONV_BC_AXES),
                      conv_C=((batch, k - 1, g, n), conv_dtype, CONV_BC_AXES),
                      ssm=((batch, h, p, n), state_dtype, SSM_AXES))


def _rows(name: str, start: int, stop: int, *, transpose: bool = True) -> HFLayout:
    return HFLayout(perm=LINEAR.perm if transpose else None, name=f"../{name}", region=(0, start, stop))


def _conv(name: str, start: int, stop: int) -> HFLayout:
    return HFLayout(name=name, region=(0, start, stop))


class GroupedGatedRMSNorm(nnx.Module):
    """weight * rmsnorm_per_group(y * silu(z)): the RMS is taken over each group's heads
    (H / G heads of P channels), so it stays local to a rank holding whole groups."""

    def __init__(self, heads: int, head_dim: int, groups: int, eps: float, dtype):
        self.weight = param((heads, head_dim), HEADS, dtype)
        self.groups = groups
        self.eps = eps

    def __call__(self, y: jax.Array, z: jax.Array) -> jax.Array:
        """y, z: [B, T, H, P] -> [B, T, H, P] float32."""
        gated = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
        b, t, h, p = gated.shape
        normed = rms_normalise(gated.reshape(b, t, self.groups, (h // self.groups) * p), self.eps)
        return self.weight[...].astype(jnp.float32) * normed.reshape(b, t, h, p)


class Mamba2Mixer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rules: AxisRules, options: RuntimeOptions):
        e = cfg.hidden_size
        h, p, g, n = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.mamba_n_groups, cfg.mamba_state_size
        self.dims = (h, p, g, n)
        self.kernel_size = cfg.mamba_conv_kernel
        self.chunk_size = cfg.mamba_chunk_size
        self.dt_min = cfg.mamba_dt_min
        hp, gn = h * p, g * n
        # in_proj rows: [z | x | B | C | dt].
        starts = {"z": 0, "x": hp, "B": 2 * hp, "C": 2 * hp + gn, "dt": 2 * hp + 2 * gn}
        bias = cfg.mamba_proj_bias

        def proj(seg: str, out, axes, width: int):
            a = starts[seg]
            return Linear((e,), out, ("embed",), axes, dtype, bias=bias,
                          hf_layout=_rows("in_proj.weight", a, a + width),
                          hf_bias_layout=_rows("in_proj.bias", a, a + width, transpose=False))

        self.in_proj_z = proj("z", (h, p), HEADS, hp)
        self.in_proj_x = proj("x", (h, p), HEADS, hp)
        self.in_proj_B = proj("B", (g, n), GROUPS, gn)
        self.in_proj_C = proj("C", (g, n), GROUPS, gn)
        self.in_proj_dt = proj("dt", (h,), ("ssm_heads",), h)
        # conv1d channels: [x | B | C].
        k = self.kernel_size
        self.conv_x = param((h, p, k), HEADS + (None,), dtype, _conv("conv1d.weight", 0, hp))
        self.conv_B = param((g, n, k), GROUPS + (None,), dtype, _conv("conv1d.weight", hp, hp + gn))
        self.conv_C = param((g, n, k), GROUPS + (None,), dtype, _conv("conv1d.weight", hp + gn, hp + 2 * gn))
        if cfg.mamba_conv_bias:
            self.conv_x_bias = param((h, p), HEADS, dtype, _conv("conv1d.bias", 0, hp))
            self.conv_B_bias = param((g, n), GROUPS, dtype, _conv("conv1d.bias", hp, hp + gn))
            self.conv_C_bias = param((g, n), GROUPS, dtype, _conv("conv1d.bias", hp + gn, hp + 2 * gn))
        else:
            self.conv_x_bias = self.conv_B_bias = self.conv_C_bias = None
        self.dt_bias = param((h,), ("ssm_heads",), dtype)
        self.A_log = param((h,), ("ssm_heads",), dtype)
        self.D = param((h,), ("ssm_heads",), dtype)
        self.norm = GroupedGatedRMSNorm(h, p, g, cfg.rms_norm_eps, dtype)
        self.out_proj = Linear((h, p), (e,), HEADS, ("embed",), dtype, bias=bias)
        self.rules = rules
        self.options = options

    def __call__(self, x: jax.Array, cache: MambaCache | None, lengths: jax.Array, *,
                 mode: str) -> tuple[jax.Array, MambaCache | None]:
        """x: [B, T, E]. "prefill" / "extend" continue from `cache` (zeros when fresh) over
        `lengths` valid tokens per row; "decode" takes one token."""
        h, p, g, n = self.dims
        bsz, t = x.shape[:2]
        c = self.rules.constrain
        x = c(x, ("batch", "seq", "embed"))
        z, xs = self.in_proj_z(x), self.in_proj_x(x)
        bm, cm, dt = self.in_proj_B(x), self.in_proj_C(x), self.in_proj_dt(x)
        if cache is None:
            zeros = lambda a, b: jnp.zeros((bsz, self.kernel_size - 1, a, b), x.dtype)  # noqa: E731
            conv_states, state = (zeros(h, p), zeros(g, n), zeros(g, n)), None
        else:
            conv_states = (cache.conv_x, cache.conv_B, cache.conv_C)
            state = cache.ssm.astype(jnp.float32)
        with jax.named_scope("conv1d"):
            conv_lengths = jnp.ones_like(lengths) if mode == "decode" else lengths
            biases = (self.conv_x_bias, self.conv_B_bias, self.conv_C_bias)
            (xs, sx), (bm, sb), (cm, sc) = (
                causal_conv(u, s, w[...], conv_lengths, None if b_ is None else b_[...])
                for u, s, w, b_ in zip((xs, bm, cm), conv_states, (self.conv_x, self.conv_B, self.conv_C),
                                       biases))
        xs, bm, cm = c(xs, ("batch", "seq", "ssm_heads", None)), c(bm, ("batch", "seq", "ssm_groups", None)), \
            c(cm, ("batch", "seq", "ssm_groups", None))
        dt = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
        dt = jnp.maximum(dt, self.dt_min)
        a = -jnp.exp(self.A_log[...].astype(jnp.float32))
        d = self.D[...]
        with jax.named_scope("ssd"):
            if mode == "decode":
                if state is None:
                    raise ValueError("decode needs a cache")
                y, state = ssd.ssd_step(xs[:, 0], dt[:, 0], a, bm[:, 0], cm[:, 0], state, D=d)
                y = y[:, None]
            else:
                y, state = ssd.ssd_chunked(xs, dt, a, bm, cm, D=d, initial_state=state, lengths=lengths,
                                           chunk_size=self.chunk_size)
        y = c(y, ("batch", "seq", "ssm_heads", None))
        y = self.norm(y, z).astype(x.dtype)
        out = c(self.out_proj(y), ("batch", "seq", "embed"))
        if cache is None:
            return out, None
        return out, MambaCache(conv_x=c(sx.astype(cache.conv_x.dtype), CONV_X_AXES),
                               conv_B=c(sb.astype(cache.conv_B.dtype), CONV_BC_AXES),
                               conv_C=c(sc.astype(cache.conv_C.dtype), CONV_BC_AXES),
                               ssm=c(state.astype(cache.ssm.dtype), SSM_AXES))
