"""Pallas (Triton backend) GPU kernels for the gated delta rule.

Same contracts as :mod:`jaxpar.kernels_pallas.gated_delta_rule` plus ``interpret`` (run the
kernel bodies through the Pallas interpreter, e.g. on CPU) and tiling knobs.

Chunked prefill is two kernels (the structure flash-linear-attention also uses):

1. ``_prepare_kernel``, grid (batch, value head, chunk), fully parallel over chunks:
   l2norm, in-chunk cumulative decay G (float32), Gamma = exp(G_i - G_j) masked *before*
   the exp, A = strict_lower(beta_i k_i.k_j Gamma_ij), T = (I + A)^-1 by forward
   substitution in registers, and U = T (beta V), W = T (beta exp(G) K).
2. ``_state_kernel``, grid (batch, value head, Dv block): carries the state [Dk, block_v]
   across chunks in a ``fori_loop`` (initial state in, final state out) and writes
   O = (Q exp(G)) S + (tril(Q K^T) Gamma) (U - W S). State columns are independent, so
   splitting Dv into blocks is exact and gives the GPU more programs.

GQA is an index map (value head h reads key head h // (Hv // Hk)); nothing is repeated in
memory. Ragged rows and T not a multiple of the chunk are handled by padding with
g = beta = 0, an exact no-op. float32 inputs use IEEE float32 matmuls; bf16 inputs use bf16
MMA with float32 accumulation (like FLA). Decay, cumsum, exp, the triangular solve and the
state are always float32.

Decode: ``gated_delta_rule_step_pallas`` (grid (batch, value head, Dv block), state updated
in place through input/output aliasing) and ``fused_conv_gdn_decode_step_pallas``, which also
runs the causal depthwise conv1d + SiLU of the q/k/v channels inside the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxpar.kernels_pallas.attention_pallas import (
    UnsupportedShapeError,
    mm,
    require_power_of_two,
    triton_params,
)

__all__ = [
    "chunk_gated_delta_rule_pallas",
    "gated_delta_rule_step_pallas",
    "fused_conv_gdn_decode_step_pallas",
]

_L2_EPS = 1e-6


def _l2norm(x: jax.Array) -> jax.Array:
    """Row-wise l2norm of a float32 [..., D] tile (same eps as the reference)."""
    return x * lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + _L2_EPS)


def _compute_dtype(dtype) -> jnp.dtype:
    """Matmul operand dtype: 16-bit inputs keep 16-bit operands, everything else float32."""
    return jnp.dtype(dtype) if jnp.dtype(dtype).itemsize == 2 else jnp.dtype(jnp.float32)


def _check_heads(hk: int, hv: int, dk: int, dv: int, block_v: int | None) -> tuple[int, int]:
    """Checks the head layout against the Triton tile rules; returns (Hv // Hk, block_v)."""
    if hv % hk:
        raise UnsupportedShapeError(f"value heads Hv={hv} must be a multiple of key heads {hk}")
    require_power_of_two("key head_dim Dk", dk)
    require_power_of_two("value head_dim Dv", dv)
    block_v = min(dv, 64) if block_v is None else block_v
    require_power_of_two("block_v", block_v)
    if dv % block_v:
        raise UnsupportedShapeError(f"block_v={block_v} must divide value head_dim Dv={dv}")
    return hv // hk, block_v


def _check_sequence_shapes(q, k, v, g, beta) -> None:
    """q, k [B, T, Hk, Dk], v [B, T, Hv, Dv], g and beta [B, T, Hv]."""
    b, t = k.shape[:2]
    if q.shape != k.shape or v.shape[:2] != (b, t) or g.shape != (b, t, v.shape[2]):
        raise ValueError(f"bad GDN shapes q{q.shape} k{k.shape} v{v.shape} g{g.shape}")
    if beta.shape != g.shape:
        raise ValueError(f"beta {beta.shape} must match g {g.shape}")


# ------------------------------------------------------------------- chunked: prepare


def _unit_lower_inverse(a: jax.Array) -> jax.Array:
    """(I + A)^-1 for a strictly lower-triangular [C, C] float32 tile, in registers.

    Forward substitution one row at a time: T_i = e_i - sum_j A_ij T_j. Triton cannot index
    a register tile dynamically, so row i is selected with a mask and a reduction, and
    written back with ``where``. Rows > i of T are still identity rows (and A_ij = 0 for
    j >= i), so the full-width product is exact.
    """
    c = a.shape[0]
    rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    eye = (rows == cols).astype(jnp.float32)

    def body(i, t):
        a_i = jnp.sum(jnp.where(rows == i, a, 0.0), axis=0)  # row i of A, indexed by j
        t_i = jnp.sum(a_i[:, None] * t, axis=0)  # sum_j A_ij T_j
        return jnp.where(rows == i, eye - t_i[None, :], t)

    return lax.fori_loop(1, c, body, eye)


def _prepare_kernel(k_ref, v_ref, g_ref, beta_ref, u_ref, w_ref, *, use_qk_l2norm):
    """One (batch, value head, chunk): U = T (beta V), W = T (beta exp(G) K).

    k_ref: [C, Dk]; v_ref: [C, Dv]; g_ref, beta_ref: [C] float32; u_ref: [C, Dv];
    w_ref: [C, Dk].
    """
    cd = u_ref.dtype
    k = k_ref[...].astype(jnp.float32)
    if use_qk_l2norm:
        k = _l2norm(k)
    g = g_ref[...]
    beta = beta_ref[...]
    c = g.shape[0]
    big_g = jnp.cumsum(g)  # float32 cumulative log decay
    rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    # Mask before exp: above the diagonal G_i - G_j > 0 could overflow.
    gamma = jnp.exp(jnp.where(rows >= cols, big_g[:, None] - big_g[None, :], -jnp.inf))
    kc = k.astype(cd)
    a = jnp.where(rows > cols, beta[:, None] * mm(kc, kc, trans_b=True) * gamma, 0.0)
    t_inv = _unit_lower_inverse(a).astype(cd)
    v = v_ref[...].astype(jnp.float32)
    u_ref[...] = mm(t_inv, (v * beta[:, None]).astype(cd)).astype(u_ref.dtype)
    w_ref[...] = mm(t_inv, (k * (beta * jnp.exp(big_g))[:, None]).astype(cd)).astype(w_ref.dtype)


# --------------------------------------------------------------------- chunked: state


def _state_kernel(
    q_ref, k_ref, g_ref, u_ref, w_ref, s0_ref, o_ref, s_ref, *, chunk, scale, use_qk_l2norm
):
    """One (batch, value head, Dv block): the chunk loop carrying S [Dk, block_v].

    q_ref, k_ref: [Tp, Dk]; g_ref: [Tp] float32; u_ref: [Tp, block_v]; w_ref: [Tp, Dk];
    s0_ref, s_ref: [Dk, block_v] float32; o_ref: [Tp, block_v].
    """
    cd = u_ref.dtype
    n_chunks = g_ref.shape[0] // chunk
    rows = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    cols = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    last = jnp.arange(chunk) == chunk - 1

    def body(n, s):
        sl = pl.ds(n * chunk, chunk)
        q = q_ref[sl, :].astype(jnp.float32)
        k = k_ref[sl, :].astype(jnp.float32)
        if use_qk_l2norm:
            q, k = _l2norm(q), _l2norm(k)
        q = q * scale
        big_g = jnp.cumsum(g_ref[sl])
        g_last = jnp.sum(jnp.where(last, big_g, 0.0))
        s_cd = s.astype(cd)
        # Vn = U - W S: the part of the chunk's values the state does not already predict.
        v_new = u_ref[sl, :].astype(jnp.float32) - mm(w_ref[sl, :], s_cd)
        gamma = jnp.exp(jnp.where(rows >= cols, big_g[:, None] - big_g[None, :], -jnp.inf))
        attn = mm(q.astype(cd), k.astype(cd), trans_b=True) * gamma
        v_new_cd = v_new.astype(cd)
        o = mm((q * jnp.exp(big_g)[:, None]).astype(cd), s_cd) + mm(attn.astype(cd), v_new_cd)
        o_ref[sl, :] = o.astype(o_ref.dtype)
        k_decayed = (k * jnp.exp(g_last - big_g)[:, None]).astype(cd)
        return s * jnp.exp(g_last) + mm(k_decayed, v_new_cd, trans_a=True)

    s_ref[...] = lax.fori_loop(0, n_chunks, body, s0_ref[...])


def chunk_gated_delta_rule_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    *,
    initial_state: jax.Array | None = None,
    lengths: jax.Array | None = None,
    chunk_size: int = 64,
    use_qk_l2norm: bool = True,
    scale: float | None = None,
    block_v: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Chunked gated delta rule on GPU (Pallas/Triton). Same contract as
    ``gated_delta_rule.chunk_gated_delta_rule``.

    q, k: [B, T, Hk, Dk]; v: [B, T, Hv, Dv]; g, beta: [B, T, Hv]; initial_state:
    [B, Hv, Dk, Dv] float32 or None; lengths: [B] int32 or None.
    Returns (o [B, T, Hv, Dv] in v.dtype, final_state [B, Hv, Dk, Dv] float32).
    Dk, Dv, chunk_size and block_v (default min(Dv, 64)) must be powers of two >= 16.
    """
    _check_sequence_shapes(q, k, v, g, beta)
    b, t, hv, dv = v.shape
    dk = k.shape[-1]
    ratio, block_v = _check_heads(k.shape[2], hv, dk, dv, block_v)
    require_power_of_two("chunk_size", chunk_size)
    scale = dk**-0.5 if scale is None else scale
    cd = _compute_dtype(v.dtype)

    with jax.named_scope("gdn_pallas_inputs"):
        g = g.astype(jnp.float32)
        beta = beta.astype(jnp.float32)
        valid = None
        if lengths is not None:
            valid = jnp.arange(t)[None, :] < lengths[:, None]
            g = jnp.where(valid[..., None], g, 0.0)
            beta = jnp.where(valid[..., None], beta, 0.0)
        pad = -t % chunk_size
        if pad:  # g = beta = 0 steps are exact no-ops
            pad_t = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
            q, k, v, g, beta = map(pad_t, (q, k, v, g, beta))
        tp = t + pad
        # [B, Hv, Tp]: each program reads a contiguous run of its head's decays.
        g_t, beta_t = jnp.swapaxes(g, 1, 2), jnp.swapaxes(beta, 1, 2)
        s0 = (
            jnp.zeros((b, hv, dk, dv), jnp.float32)
            if initial_state is None
            else initial_state.astype(jnp.float32)
        )

    params = triton_params(num_warps, num_stages)
    with jax.named_scope("gdn_pallas_prepare"):
        u, w = pl.pallas_call(
            functools.partial(_prepare_kernel, use_qk_l2norm=use_qk_l2norm),
            grid=(b, hv, tp // chunk_size),
            in_specs=[
                pl.BlockSpec((None, chunk_size, None, dk), lambda i, h, n: (i, n, h // ratio, 0)),
                pl.BlockSpec((None, chunk_size, None, dv), lambda i, h, n: (i, n, h, 0)),
                pl.BlockSpec((None, None, chunk_size), lambda i, h, n: (i, h, n)),
                pl.BlockSpec((None, None, chunk_size), lambda i, h, n: (i, h, n)),
            ],
            out_specs=[
                pl.BlockSpec((None, chunk_size, None, dv), lambda i, h, n: (i, n, h, 0)),
                pl.BlockSpec((None, chunk_size, None, dk), lambda i, h, n: (i, n, h, 0)),
            ],
            out_shape=[
                jax.ShapeDtypeStruct((b, tp, hv, dv), cd),
                jax.ShapeDtypeStruct((b, tp, hv, dk), cd),
            ],
            compiler_params=params,
            interpret=interpret,
            name="jaxpar_gdn_prepare",
        )(k, v, g_t, beta_t)

    with jax.named_scope("gdn_pallas_state"):
        kernel = functools.partial(
            _state_kernel, chunk=chunk_size, scale=scale, use_qk_l2norm=use_qk_l2norm
        )
        o, state = pl.pallas_call(
            kernel,
            grid=(b, hv, dv // block_v),
            in_specs=[
                pl.BlockSpec((None, tp, None, dk), lambda i, h, j: (i, 0, h // ratio, 0)),
                pl.BlockSpec((None, tp, None, dk), lambda i, h, j: (i, 0, h // ratio, 0)),
                pl.BlockSpec((None, None, tp), lambda i, h, j: (i, h, 0)),
                pl.BlockSpec((None, tp, None, block_v), lambda i, h, j: (i, 0, h, j)),
                pl.BlockSpec((None, tp, None, dk), lambda i, h, j: (i, 0, h, 0)),
                pl.BlockSpec((None, None, dk, block_v), lambda i, h, j: (i, h, 0, j)),
            ],
            out_specs=[
                pl.BlockSpec((None, tp, None, block_v), lambda i, h, j: (i, 0, h, j)),
                pl.BlockSpec((None, None, dk, block_v), lambda i, h, j: (i, h, 0, j)),
            ],
            out_shape=[
                jax.ShapeDtypeStruct((b, tp, hv, dv), v.dtype),
                jax.ShapeDtypeStruct((b, hv, dk, dv), jnp.float32),
            ],
            compiler_params=params,
            interpret=interpret,
            name="jaxpar_gdn_state",
        )(q, k, g_t, u, w, s0)

    o = o[:, :t]
    if valid is not None:
        o = jnp.where(valid[..., None, None], o, jnp.zeros((), o.dtype))
    return o, state


# ---------------------------------------------------------------------------- decode


def _delta_step(q, k, v, g, beta, s, *, scale, use_qk_l2norm):
    """One token on float32 tiles: q, k [Dk]; v [BV]; g, beta scalars; s [Dk, BV]."""
    if use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    q = q * scale
    s = s * jnp.exp(g)
    kv_mem = jnp.sum(s * k[:, None], axis=0)  # S^T k
    delta = beta * (v - kv_mem)
    s = s + k[:, None] * delta[None, :]
    o = jnp.sum(s * q[:, None], axis=0)  # S^T q
    return o, s


def _step_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, s_ref, o_ref, s_out_ref, *, scale, l2):
    """One (batch, value head, Dv block) decode token."""
    o, s = _delta_step(
        q_ref[...].astype(jnp.float32),
        k_ref[...].astype(jnp.float32),
        v_ref[...].astype(jnp.float32),
        g_ref[...].astype(jnp.float32),
        beta_ref[...].astype(jnp.float32),
        s_ref[...],
        scale=scale,
        use_qk_l2norm=l2,
    )
    o_ref[...] = o.astype(o_ref.dtype)
    s_out_ref[...] = s


def _step_specs(dk: int, block_v: int):
    """BlockSpecs shared by the decode kernels' g, beta, state and outputs."""
    scalar = pl.BlockSpec((None, None), lambda i, h, j: (i, h))
    state = pl.BlockSpec((None, None, dk, block_v), lambda i, h, j: (i, h, 0, j))
    o = pl.BlockSpec((None, None, block_v), lambda i, h, j: (i, h, j))
    return scalar, state, o


def gated_delta_rule_step_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    state: jax.Array,
    *,
    use_qk_l2norm: bool = True,
    scale: float | None = None,
    block_v: int | None = None,
    num_warps: int = 4,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """One decode token on GPU. Same contract as ``gated_delta_rule.gated_delta_rule_step``.

    q, k: [B, Hk, Dk]; v: [B, Hv, Dv]; g, beta: [B, Hv]; state: [B, Hv, Dk, Dv] float32
    (aliased to the new state: donate it under jit to update in place).
    Returns (o [B, Hv, Dv] in v.dtype, new_state float32).
    """
    b, hk, dk = k.shape
    hv, dv = v.shape[1], v.shape[2]
    ratio, block_v = _check_heads(hk, hv, dk, dv, block_v)
    scale = dk**-0.5 if scale is None else scale
    scalar, state_spec, o_spec = _step_specs(dk, block_v)
    qk_spec = pl.BlockSpec((None, None, dk), lambda i, h, j: (i, h // ratio, 0))
    return pl.pallas_call(
        functools.partial(_step_kernel, scale=scale, l2=use_qk_l2norm),
        grid=(b, hv, dv // block_v),
        in_specs=[
            qk_spec,
            qk_spec,
            pl.BlockSpec((None, None, block_v), lambda i, h, j: (i, h, j)),
            scalar,
            scalar,
            state_spec,
        ],
        out_specs=[o_spec, state_spec],
        out_shape=[
            jax.ShapeDtypeStruct((b, hv, dv), v.dtype),
            jax.ShapeDtypeStruct((b, hv, dk, dv), jnp.float32),
        ],
        input_output_aliases={5: 1},
        compiler_params=triton_params(num_warps, 1),
        interpret=interpret,
        name="jaxpar_gdn_decode_step",
    )(q, k, v, g, beta, state.astype(jnp.float32))


# ------------------------------------------------------------------ fused conv decode


def _conv_silu(win_ref, w_ref, b_ref, out_dtype):
    """Causal depthwise conv (one output step) + SiLU: window [n, K] . taps [n, K] + bias.

    Rounded through out_dtype like the reference (conv output is stored in the activation
    dtype before the delta rule reads it back as float32).
    """
    y = jnp.sum(win_ref[...].astype(jnp.float32) * w_ref[...].astype(jnp.float32), axis=1)
    y = y + b_ref[...].astype(jnp.float32)
    y = y * jax.nn.sigmoid(y)
    return y.astype(out_dtype).astype(jnp.float32)


def _fused_kernel(
    wq_ref, wk_ref, wv_ref, cq_ref, ck_ref, cv_ref, bq_ref, bk_ref, bv_ref,
    g_ref, beta_ref, s_ref, o_ref, s_out_ref, *, scale, l2,
):  # fmt: skip
    """One (batch, value head, Dv block): conv + SiLU of its q/k/v channels, then one token."""
    act = o_ref.dtype
    o, s = _delta_step(
        _conv_silu(wq_ref, cq_ref, bq_ref, act),
        _conv_silu(wk_ref, ck_ref, bk_ref, act),
        _conv_silu(wv_ref, cv_ref, bv_ref, act),
        g_ref[...].astype(jnp.float32),
        beta_ref[...].astype(jnp.float32),
        s_ref[...],
        scale=scale,
        use_qk_l2norm=l2,
    )
    o_ref[...] = o.astype(o_ref.dtype)
    s_out_ref[...] = s


def fused_conv_gdn_decode_step_pallas(
    mixed_qkv: jax.Array,
    conv_state: jax.Array,
    conv_weight: jax.Array,
    conv_bias: jax.Array | None,
    g: jax.Array,
    beta: jax.Array,
    state: jax.Array,
    *,
    num_k_heads: int,
    head_k_dim: int,
    num_v_heads: int,
    use_qk_l2norm: bool = True,
    scale: float | None = None,
    block_v: int | None = None,
    num_warps: int = 4,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Conv-state shift + causal depthwise conv1d + SiLU + one delta-rule token.

    Same contract as ``gated_delta_rule.fused_conv_gdn_decode_step``: mixed_qkv [B, C]
    ([q | k | v] channels), conv_state [B, C, S] (S >= K - 1), conv_weight [C, K],
    conv_bias [C] or None, g/beta [B, Hv], state [B, Hv, Dk, Dv] float32.
    Returns (o [B, Hv, Dv], new conv_state [B, C, S], new state).

    The conv-state shift is a plain copy that XLA does beside the kernel: it builds the
    [B, C, K] input window (last K - 1 states + the new token), which the kernel reads and
    which is also the new conv state. The conv, SiLU, l2norm and the state update run in
    the kernel. K must be a power of two (Triton tile rule; Qwen3-Next uses K = 4).
    """
    b, channels = mixed_qkv.shape
    ksize = conv_weight.shape[-1]
    hk, dk, hv = num_k_heads, head_k_dim, num_v_heads
    dv = (channels - 2 * hk * dk) // hv
    if 2 * hk * dk + hv * dv != channels:
        raise ValueError(f"C={channels} is not 2*Hk*Dk + Hv*Dv for Hk={hk} Dk={dk} Hv={hv}")
    ratio, block_v = _check_heads(hk, hv, dk, dv, block_v)
    require_power_of_two("conv kernel size K", ksize, minimum=1)
    if conv_state.shape[-1] < ksize - 1:
        raise ValueError(f"conv_state keeps {conv_state.shape[-1]} steps, K={ksize} needs K-1")
    if (2 * hk * dk) % block_v:
        raise UnsupportedShapeError(f"block_v={block_v} must divide 2*Hk*Dk={2 * hk * dk}")
    scale = dk**-0.5 if scale is None else scale

    with jax.named_scope("gdn_conv_window"):
        full = jnp.concatenate([conv_state, mixed_qkv[..., None].astype(conv_state.dtype)], -1)
        window = full[..., full.shape[-1] - ksize :]  # [B, C, K]
        new_conv_state = full[..., 1:]
    bias = jnp.zeros((channels,), conv_weight.dtype) if conv_bias is None else conv_bias

    # Channel blocks: q of key head h//R at block h//R (units of Dk), k at Hk + h//R, and
    # v of value head h, Dv block j at (2*Hk*Dk)/block_v + h*Dv/block_v + j (units of block_v).
    v0, vpb = (2 * hk * dk) // block_v, dv // block_v
    win_q = pl.BlockSpec((None, dk, ksize), lambda i, h, j: (i, h // ratio, 0))
    win_k = pl.BlockSpec((None, dk, ksize), lambda i, h, j: (i, hk + h // ratio, 0))
    win_v = pl.BlockSpec((None, block_v, ksize), lambda i, h, j: (i, v0 + h * vpb + j, 0))
    tap_q = pl.BlockSpec((dk, ksize), lambda i, h, j: (h // ratio, 0))
    tap_k = pl.BlockSpec((dk, ksize), lambda i, h, j: (hk + h // ratio, 0))
    tap_v = pl.BlockSpec((block_v, ksize), lambda i, h, j: (v0 + h * vpb + j, 0))
    bias_q = pl.BlockSpec((dk,), lambda i, h, j: (h // ratio,))
    bias_k = pl.BlockSpec((dk,), lambda i, h, j: (hk + h // ratio,))
    bias_v = pl.BlockSpec((block_v,), lambda i, h, j: (v0 + h * vpb + j,))
    scalar, state_spec, o_spec = _step_specs(dk, block_v)
    o, new_state = pl.pallas_call(
        functools.partial(_fused_kernel, scale=scale, l2=use_qk_l2norm),
        grid=(b, hv, dv // block_v),
        in_specs=[win_q, win_k, win_v, tap_q, tap_k, tap_v, bias_q, bias_k, bias_v]
        + [scalar, scalar, state_spec],
        out_specs=[o_spec, state_spec],
        out_shape=[
            jax.ShapeDtypeStruct((b, hv, dv), mixed_qkv.dtype),
            jax.ShapeDtypeStruct((b, hv, dk, dv), jnp.float32),
        ],
        input_output_aliases={11: 1},
        compiler_params=triton_params(num_warps, 1),
        interpret=interpret,
        name="jaxpar_gdn_fused_conv_decode",
    )(
        window, window, window,
        conv_weight, conv_weight, conv_weight,
        bias, bias, bias,
        g, beta, state.astype(jnp.float32),
    )  # fmt: skip
    return o, new_conv_state, new_state
