"""Pallas (Triton backend) GPU kernels for the gated delta rule.

Same contracts as :mod:`jaxpar.kernels_pallas.gated_delta_rule` plus ``interpret`` (run the
kernel bodies through the Pallas interpreter, e.g. on CPU) and tiles (``None`` = the
per-head-dim defaults of :func:`chunk_tiles`).

Chunked prefill has the shape of flash-linear-attention's ``chunk_gated_delta_rule``: only
the state carry is serial, and it does two matmuls per chunk.

0. XLA (one fused pass): l2norm of q and k, the query scale, the per-chunk cumulative
   log decay G (float32), and g = beta = 0 on padding (an exact no-op step).
1. Chunk-local work, grid (batch, value head, chunk), fully parallel, in three kernels (as
   FLA splits it) so none holds both the 16 x 16 blocks and the [C, D] tiles in registers:
   ``_kkt_kernel``: A = strict_lower(beta_i k_i.k_j exp(G_i - G_j)), one tensor-core matmul;
   ``_solve_kernel``: T = (I + A)^-1 in 16 x 16 blocks: the diagonal blocks by forward
   substitution (every block in the same 15 steps), merged into the off-diagonal blocks by
   T_ij = -T_ii sum_m A_im T_mj;
   ``_wu_kernel``: U = T (beta V), W = T (beta exp(G) K), one [C, C] matmul each.
2. ``_state_kernel``, grid (batch, value head, Dv block), serial over chunks: stores the
   state entering each chunk, h_n, and the new values Vn = U - W S, and carries
   S <- exp(G_last) S + (K exp(G_last - G))^T Vn. State columns are independent, so Dv
   blocks are exact and give the GPU more programs.
3. ``_output_kernel``, grid (batch, value head, chunk x Dv block), fully parallel:
   O = (Q exp(G)) h_n + (tril(Q K^T) exp(G_i - G_j)) Vn.

GQA is an index map (value head h reads key head h // (Hv // Hk)); nothing is repeated in
memory. bf16 inputs use bf16 MMA with float32 accumulation (like FLA); float32 inputs use
split-bf16 MMA (``triton_common.mm``) and IEEE float32 in the 16 x 16 solve. Decays, the
triangular solve and the carried state are float32; h_n and Vn are stored in the input
dtype.

Decode: ``gated_delta_rule_step_pallas``, grid (batch, value head, Dv block), state updated
in place through input/output aliasing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxpar.kernels_pallas.errors import UnsupportedShapeError
from jaxpar.kernels_pallas.triton_common import mm, require_power_of_two, sm_count, triton_params

__all__ = [
    "chunk_tiles",
    "chunk_gated_delta_rule_pallas",
    "gated_delta_rule_step_pallas",
]

_L2_EPS = 1e-6
# Side of the diagonal blocks the triangular inverse is solved in (FLA uses 16 too).
_SUB = 16


def _l2norm(x: jax.Array) -> jax.Array:
    """Row-wise l2norm in float32 (same eps as the reference)."""
    x = x.astype(jnp.float32)
    return x * lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + _L2_EPS)


def _compute_dtype(dtype) -> jnp.dtype:
    """Matmul operand dtype: 16-bit inputs keep 16-bit operands, everything else float32."""
    return jnp.dtype(dtype) if jnp.dtype(dtype).itemsize == 2 else jnp.dtype(jnp.float32)


def chunk_tiles(dk: int, dv: int, dtype, programs: int, sms: int | None = None) -> dict:
    """Tiles of the chunked kernels for head dims (dk, dv) (sm_90, no spills measured by
    ``scripts/kernel_resources.py``).

    block_v (state kernel): 64 (32 for float32 or dk = 256: the state tile [dk, block_v]
    lives in registers), halved while batch x heads x Dv / block_v would leave SMs idle.
    ``programs`` is batch x value heads. Head dims above 128 take 8 warps in the [C, D]
    kernels; the solve always 4. bf16 tiles do not spill; float32 ones (split-bf16 matmuls,
    a parity path rather than a speed path) spill 0.03-4.5 KB per thread.
    """
    sms = sm_count() if sms is None else sms
    f32 = jnp.dtype(dtype) == jnp.float32
    block_v = min(dv, 32 if (f32 or dk > 128) else 64)
    while block_v > 16 and programs * (dv // block_v) < sms:
        block_v //= 2
    warps = 8 if max(dk, dv) > 128 else 4
    return dict(block_v=block_v, block_v_out=min(dv, 128), solve_warps=4, warps=warps,
                num_stages=1 if f32 else 2)  # fmt: skip


def _check_heads(hk: int, hv: int, dk: int, dv: int, block_v: int) -> int:
    """Checks the head layout against the Triton tile rules; returns Hv // Hk."""
    if hv % hk:
        raise UnsupportedShapeError(f"value heads Hv={hv} must be a multiple of key heads {hk}")
    require_power_of_two("key head_dim Dk", dk)
    require_power_of_two("value head_dim Dv", dv)
    require_power_of_two("block_v", block_v)
    if dv % block_v:
        raise UnsupportedShapeError(f"block_v={block_v} must divide value head_dim Dv={dv}")
    return hv // hk


def _check_sequence_shapes(q, k, v, g, beta) -> None:
    """q, k [B, T, Hk, Dk], v [B, T, Hv, Dv], g and beta [B, T, Hv]."""
    b, t = k.shape[:2]
    if q.shape != k.shape or v.shape[:2] != (b, t) or g.shape != (b, t, v.shape[2]):
        raise ValueError(f"bad GDN shapes q{q.shape} k{k.shape} v{v.shape} g{g.shape}")
    if beta.shape != g.shape:
        raise ValueError(f"beta {beta.shape} must match g {g.shape}")


# ------------------------------------------------------------------- chunked: prepare


def _unit_lower_inverses(blocks: list) -> tuple:
    """(I + A)^-1 for each strictly lower-triangular [16, 16] float32 tile, in registers.

    Forward substitution one row at a time, every tile in the same step:
    T_r = e_r - sum_j A_rj T_j. Triton cannot index a register tile dynamically, so row r
    is selected with a mask and a reduction and written back with ``where``. Rows > r of T
    are still identity rows (and A_rj = 0 for j >= r), so the full-width product is exact.
    """
    rows = lax.broadcasted_iota(jnp.int32, (_SUB, _SUB), 0)
    cols = lax.broadcasted_iota(jnp.int32, (_SUB, _SUB), 1)
    eye = (rows == cols).astype(jnp.float32)

    def body(r, ts):
        out = []
        for a, t in zip(blocks, ts):
            a_r = jnp.sum(jnp.where(rows == r, a, 0.0), axis=0)  # row r of A, indexed by j
            t_r = jnp.sum(a_r[:, None] * t, axis=0)  # sum_j A_rj T_j
            out.append(jnp.where(rows == r, eye - t_r[None, :], t))
        return tuple(out)

    return lax.fori_loop(1, _SUB, body, tuple(eye for _ in blocks))


def _kkt_kernel(k_ref, g_ref, beta_ref, a_ref):
    """One (batch, value head, chunk): A = strict_lower(beta_i k_i.k_j exp(G_i - G_j)), one
    [C, Dk] x [Dk, C] tensor-core matmul. k_ref: [C, Dk]; g_ref, beta_ref: [C] float32;
    a_ref: [C, C] float32."""
    k = k_ref[...]
    g = g_ref[...]
    c = g.shape[0]
    rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    # Mask before exp: above the diagonal G_i - G_j > 0 could overflow.
    decay = jnp.exp(jnp.where(rows > cols, g[:, None] - g[None, :], -jnp.inf))
    a_ref[...] = beta_ref[...][:, None] * mm(k, k, trans_b=True) * decay


def _solve_kernel(a_ref, t_ref):
    """One (batch, value head, chunk): T = (I + A)^-1 for strictly lower A, in 16 x 16
    blocks read straight from a_ref [C, C] float32; writes t_ref [C, C] (zeros above the
    block diagonal)."""
    nb = a_ref.shape[0] // _SUB
    blk = [pl.ds(i * _SUB, _SUB) for i in range(nb)]
    diagonal = _unit_lower_inverses([a_ref[blk[i], blk[i]] for i in range(nb)])
    t = {(i, i): ti for i, ti in enumerate(diagonal)}
    for i in range(1, nb):
        for j in range(i - 1, -1, -1):  # T_ij = -T_ii sum_{j <= m < i} A_im T_mj
            acc = functools.reduce(lambda x, y: x + y,
                                   [mm(a_ref[blk[i], blk[m]], t[m, j], exact=True)
                                    for m in range(j, i)])  # fmt: skip
            t[i, j] = -mm(t[i, i], acc, exact=True)
    zeros = jnp.zeros((_SUB, _SUB), t_ref.dtype)
    for i in range(nb):
        for j in range(nb):
            t_ref[blk[i], blk[j]] = t[i, j].astype(t_ref.dtype) if j <= i else zeros


def _wu_kernel(k_ref, v_ref, g_ref, beta_ref, t_ref, w_ref, u_ref):
    """One (batch, value head, chunk): W = T (beta exp(G) K), U = T (beta V), one tensor-core
    matmul each. k_ref, w_ref: [C, Dk]; v_ref, u_ref: [C, Dv]; g_ref, beta_ref: [C];
    t_ref: [C, C]."""
    cd = u_ref.dtype
    t = t_ref[...]
    beta = beta_ref[...]
    v = (v_ref[...].astype(jnp.float32) * beta[:, None]).astype(cd)
    k = (k_ref[...].astype(jnp.float32) * (beta * jnp.exp(g_ref[...]))[:, None]).astype(cd)
    u_ref[...] = mm(t, v).astype(cd)
    w_ref[...] = mm(t, k).astype(cd)


# --------------------------------------------------------------------- chunked: state


def _state_kernel(w_ref, u_ref, k_ref, g_ref, s0_ref, h_ref, vn_ref, s_ref, *, chunk):
    """One (batch, value head, Dv block): the chunk loop carrying S [Dk, block_v].

    w_ref, k_ref: [Tp, Dk]; u_ref, vn_ref: [Tp, block_v]; g_ref: [Tp] float32 (cumulative
    within each chunk); s0_ref, s_ref: [Dk, block_v] float32; h_ref: [N, Dk, block_v].
    """
    cd = vn_ref.dtype
    n_chunks = g_ref.shape[0] // chunk
    last = jnp.arange(chunk) == chunk - 1

    def body(n, s):
        sl = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)
        h_ref[n] = s.astype(h_ref.dtype)  # the state entering chunk n
        s_cd = s.astype(cd)
        # Vn = U - W S: the part of the chunk's values the state does not already predict.
        v_new = (u_ref[sl, :].astype(jnp.float32) - mm(w_ref[sl, :], s_cd)).astype(cd)
        vn_ref[sl, :] = v_new
        g = g_ref[sl]
        g_last = jnp.sum(jnp.where(last, g, 0.0))
        k_decayed = (k_ref[sl, :].astype(jnp.float32) * jnp.exp(g_last - g)[:, None]).astype(cd)
        return s * jnp.exp(g_last) + mm(k_decayed, v_new, trans_a=True)

    s_ref[...] = lax.fori_loop(0, n_chunks, body, s0_ref[...])


# -------------------------------------------------------------------- chunked: output


def _output_kernel(q_ref, k_ref, g_ref, h_ref, vn_ref, o_ref):
    """One (batch, value head, chunk): O = (Q exp(G)) h_n + (tril(Q K^T) Gamma) Vn.

    q_ref, k_ref: [C, Dk] (normalised, q scaled); g_ref: [C] float32; h_ref: [Dk, block_v_out];
    vn_ref, o_ref: [C, block_v_out] (q K^T is recomputed per Dv block: C x C x Dk, small).
    """
    cd = vn_ref.dtype
    q = q_ref[...]
    g = g_ref[...]
    c = g.shape[0]
    rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    gamma = jnp.exp(jnp.where(rows >= cols, g[:, None] - g[None, :], -jnp.inf))
    attn = (mm(q, k_ref[...], trans_b=True) * gamma).astype(cd)
    q_decayed = (q.astype(jnp.float32) * jnp.exp(g)[:, None]).astype(cd)
    o = mm(q_decayed, h_ref[...]) + mm(attn, vn_ref[...])
    o_ref[...] = o.astype(o_ref.dtype)


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
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Chunked gated delta rule on GPU (Pallas/Triton). Same contract as
    ``gated_delta_rule.chunk_gated_delta_rule``.

    q, k: [B, T, Hk, Dk]; v: [B, T, Hv, Dv]; g, beta: [B, T, Hv]; initial_state:
    [B, Hv, Dk, Dv] float32 or None; lengths: [B] int32 or None.
    Returns (o [B, T, Hv, Dv] in v.dtype, final_state [B, Hv, Dk, Dv] float32).
    Dk, Dv, chunk_size and block_v must be powers of two >= 16. num_warps overrides the
    warps of all three kernels.
    """
    _check_sequence_shapes(q, k, v, g, beta)
    b, t, hv, dv = v.shape
    hk, dk = k.shape[2], k.shape[3]
    cd = _compute_dtype(v.dtype)
    tiles = chunk_tiles(dk, dv, cd, b * hv)
    if block_v is not None:
        tiles["block_v"] = block_v
    if num_warps is not None:
        tiles.update(solve_warps=num_warps, warps=num_warps)
    if num_stages is not None:
        tiles["num_stages"] = num_stages
    ratio = _check_heads(hk, hv, dk, dv, tiles["block_v"])
    require_power_of_two("chunk_size", chunk_size)
    scale = dk**-0.5 if scale is None else scale
    bv, c, stages = tiles["block_v"], chunk_size, tiles["num_stages"]

    with jax.named_scope("gdn_pallas_inputs"):
        g = g.astype(jnp.float32)
        beta = beta.astype(jnp.float32)
        valid = None
        if lengths is not None:
            valid = jnp.arange(t)[None, :] < lengths[:, None]
            g = jnp.where(valid[..., None], g, 0.0)
            beta = jnp.where(valid[..., None], beta, 0.0)
        pad = -t % c
        if pad:  # g = beta = 0 steps are exact no-ops
            pad_t = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
            q, k, v, g, beta = map(pad_t, (q, k, v, g, beta))
        tp, n = t + pad, (t + pad) // c
        qn = _l2norm(q) if use_qk_l2norm else q.astype(jnp.float32)
        kn = _l2norm(k) if use_qk_l2norm else k.astype(jnp.float32)
        qn, kn, v = (qn * scale).astype(cd), kn.astype(cd), v.astype(cd)
        # Cumulative log decay within each chunk, [B, Hv, Tp]: contiguous per program.
        g_cum = jnp.cumsum(g.reshape(b, n, c, hv), axis=2).reshape(b, tp, hv)
        g_cum, beta = jnp.swapaxes(g_cum, 1, 2), jnp.swapaxes(beta, 1, 2)
        s0 = (
            jnp.zeros((b, hv, dk, dv), jnp.float32)
            if initial_state is None
            else initial_state.astype(jnp.float32)
        )

    key_chunk = pl.BlockSpec((None, c, None, dk), lambda i, h, j: (i, j, h // ratio, 0))
    head_chunk = lambda width: pl.BlockSpec((None, c, None, width), lambda i, h, j: (i, j, h, 0))
    decay_chunk = pl.BlockSpec((None, None, c), lambda i, h, j: (i, h, j))
    with jax.named_scope("gdn_pallas_prepare"):
        per_chunk_square = pl.BlockSpec((None, c, None, c), lambda i, h, j: (i, j, h, 0))
        a = pl.pallas_call(
            _kkt_kernel,
            grid=(b, hv, n),
            in_specs=[key_chunk, decay_chunk, decay_chunk],
            out_specs=per_chunk_square,
            out_shape=jax.ShapeDtypeStruct((b, tp, hv, c), jnp.float32),
            compiler_params=triton_params(tiles["solve_warps"], stages),
            interpret=interpret,
            name="jaxpar_gdn_kkt",
        )(kn, g_cum, beta)
        t_inv = pl.pallas_call(
            _solve_kernel,
            grid=(b, hv, n),
            in_specs=[per_chunk_square],
            out_specs=per_chunk_square,
            out_shape=jax.ShapeDtypeStruct((b, tp, hv, c), cd),
            compiler_params=triton_params(tiles["solve_warps"], stages),
            interpret=interpret,
            name="jaxpar_gdn_solve",
        )(a)
        w, u = pl.pallas_call(
            _wu_kernel,
            grid=(b, hv, n),
            in_specs=[key_chunk, head_chunk(dv), decay_chunk, decay_chunk, head_chunk(c)],
            out_specs=[head_chunk(dk), head_chunk(dv)],
            out_shape=[jax.ShapeDtypeStruct((b, tp, hv, dk), cd),
                       jax.ShapeDtypeStruct((b, tp, hv, dv), cd)],  # fmt: skip
            compiler_params=triton_params(tiles["warps"], stages),
            interpret=interpret,
            name="jaxpar_gdn_wu",
        )(kn, v, g_cum, beta, t_inv)

    with jax.named_scope("gdn_pallas_state"):
        h, v_new, state = pl.pallas_call(
            functools.partial(_state_kernel, chunk=c),
            grid=(b, hv, dv // bv),
            in_specs=[
                pl.BlockSpec((None, tp, None, dk), lambda i, h, j: (i, 0, h, 0)),
                pl.BlockSpec((None, tp, None, bv), lambda i, h, j: (i, 0, h, j)),
                pl.BlockSpec((None, tp, None, dk), lambda i, h, j: (i, 0, h // ratio, 0)),
                pl.BlockSpec((None, None, tp), lambda i, h, j: (i, h, 0)),
                pl.BlockSpec((None, None, dk, bv), lambda i, h, j: (i, h, 0, j)),
            ],
            out_specs=[
                pl.BlockSpec((None, n, None, dk, bv), lambda i, h, j: (i, 0, h, 0, j)),
                pl.BlockSpec((None, tp, None, bv), lambda i, h, j: (i, 0, h, j)),
                pl.BlockSpec((None, None, dk, bv), lambda i, h, j: (i, h, 0, j)),
            ],
            out_shape=[
                jax.ShapeDtypeStruct((b, n, hv, dk, dv), cd),
                jax.ShapeDtypeStruct((b, tp, hv, dv), cd),
                jax.ShapeDtypeStruct((b, hv, dk, dv), jnp.float32),
            ],
            compiler_params=triton_params(tiles["warps"], stages),
            interpret=interpret,
            name="jaxpar_gdn_state",
        )(w, u, kn, g_cum, s0)

    with jax.named_scope("gdn_pallas_output"):
        # Grid axis 2 walks (chunk, Dv block) pairs: Pallas Triton grids have 3 axes.
        bo = tiles["block_v_out"]
        nvo = dv // bo
        chunk_of = lambda j: j // nvo  # noqa: E731
        o = pl.pallas_call(
            _output_kernel,
            grid=(b, hv, n * nvo),
            in_specs=[
                pl.BlockSpec((None, c, None, dk), lambda i, h, j: (i, chunk_of(j), h // ratio, 0)),
                pl.BlockSpec((None, c, None, dk), lambda i, h, j: (i, chunk_of(j), h // ratio, 0)),
                pl.BlockSpec((None, None, c), lambda i, h, j: (i, h, chunk_of(j))),
                pl.BlockSpec((None, None, None, dk, bo),
                             lambda i, h, j: (i, chunk_of(j), h, 0, j % nvo)),  # fmt: skip
                pl.BlockSpec((None, c, None, bo), lambda i, h, j: (i, chunk_of(j), h, j % nvo)),
            ],
            out_specs=pl.BlockSpec((None, c, None, bo), lambda i, h, j: (i, chunk_of(j), h, j % nvo)),
            out_shape=jax.ShapeDtypeStruct((b, tp, hv, dv), v.dtype),
            compiler_params=triton_params(tiles["warps"], stages),
            interpret=interpret,
            name="jaxpar_gdn_output",
        )(qn, kn, g_cum, h, v_new)

    o = o[:, :t]
    if valid is not None:
        o = jnp.where(valid[..., None, None], o, jnp.zeros((), o.dtype))
    return o, state


# ---------------------------------------------------------------------------- decode


def _step_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, s_ref, o_ref, s_out_ref, *, scale, l2):
    """One (batch, value head, Dv block) decode token: q, k [Dk]; v [BV]; s [Dk, BV]."""
    q = q_ref[...].astype(jnp.float32)
    k = k_ref[...].astype(jnp.float32)
    if l2:
        q, k = _l2norm(q), _l2norm(k)
    q = q * scale
    s = s_ref[...] * jnp.exp(g_ref[...].astype(jnp.float32))
    kv_mem = jnp.sum(s * k[:, None], axis=0)  # S^T k
    delta = beta_ref[...].astype(jnp.float32) * (v_ref[...].astype(jnp.float32) - kv_mem)
    s = s + k[:, None] * delta[None, :]
    o_ref[...] = jnp.sum(s * q[:, None], axis=0).astype(o_ref.dtype)  # S^T q
    s_out_ref[...] = s


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
    Returns (o [B, Hv, Dv] in v.dtype, new_state float32). block_v defaults to 32 for
    Dk = 256 (the [Dk, block_v] state tile sits in registers), else min(Dv, 64).
    """
    b, hk, dk = k.shape
    hv, dv = v.shape[1], v.shape[2]
    block_v = block_v or min(dv, 32 if dk > 128 else 64)
    ratio = _check_heads(hk, hv, dk, dv, block_v)
    scale = dk**-0.5 if scale is None else scale
    scalar = pl.BlockSpec((None, None), lambda i, h, j: (i, h))
    state_spec = pl.BlockSpec((None, None, dk, block_v), lambda i, h, j: (i, h, 0, j))
    qk_spec = pl.BlockSpec((None, None, dk), lambda i, h, j: (i, h // ratio, 0))
    v_spec = pl.BlockSpec((None, None, block_v), lambda i, h, j: (i, h, j))
    return pl.pallas_call(
        functools.partial(_step_kernel, scale=scale, l2=use_qk_l2norm),
        grid=(b, hv, dv // block_v),
        in_specs=[qk_spec, qk_spec, v_spec, scalar, scalar, state_spec],
        out_specs=[v_spec, state_spec],
        out_shape=[
            jax.ShapeDtypeStruct((b, hv, dv), v.dtype),
            jax.ShapeDtypeStruct((b, hv, dk, dv), jnp.float32),
        ],
        input_output_aliases={5: 1},
        compiler_params=triton_params(num_warps, 1),
        interpret=interpret,
        name="jaxpar_gdn_decode_step",
    )(q, k, v, g, beta, state.astype(jnp.float32))
