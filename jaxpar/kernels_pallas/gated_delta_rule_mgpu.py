"""Pallas Mosaic GPU (Hopper) kernels for the gated delta rule (Gated DeltaNet).

Same contracts as :mod:`jaxpar.kernels_pallas.gated_delta_rule` plus ``interpret`` (GPU
interpret mode on CPU, race detector on) and tiling knobs. Every matrix product is a
wgmma on bf16/f16 tiles that TMA copied into swizzled shared memory, accumulated in
float32; decays, exponentials, the triangular inverse and the carried state are float32.

Chunked prefill (chunk C = 64) is the flash-linear-attention decomposition in three
kernels, with the cheap elementwise glue (l2norm of q/k, the query scale, the in-chunk
cumulative decay G and the ragged-row mask) done by XLA first:

1. ``prepare`` (grid: chunk x value head x batch, fully parallel). A = strict_lower(
   beta_i k_i.k_j exp(G_i - G_j)) from one K K^T wgmma; X = (I + A)^-1 by a *blocked*
   inverse: the four 16 x 16 diagonal blocks by forward substitution in registers (all
   four at once, one column each per step, 16 steps), then the off-diagonal blocks from
   X = (I - N)(I + N^2) X_d with N = X_d L (L: the strictly block-lower part of A, so
   N^4 = 0). Those products run as wgmma on hi/lo bf16 splits of their float32 operands
   (three products each: near-float32 accuracy). Then W = X (beta exp(G) K) and
   U = X (beta V), stored in the input dtype like FLA.
2. ``state`` (grid: Dv block x value head x batch, serial over chunks). The state
   S [Dk, block_v] stays in float32 registers; an ``emit_pipeline`` streams each chunk's
   W, U, K and G in by TMA (prefetching the next chunks) and each chunk's V_new and start
   state H_n out: V_new = U - W S, S <- exp(G_last) S + (K exp(G_last - G))^T V_new
   (compiled, the wgmma accumulates into S in place; interpret mode, which has no
   ``run_state``, adds a fresh accumulator). Initial state in, final state out.
3. ``output`` (grid: chunk x value head x batch, fully parallel).
   O = (Q exp(G)) H_n + (tril(Q K^T) * exp(G_i - G_j)) V_new, both products into one
   accumulator. Rows past a row's length are written as zeros.

Ragged rows: g = beta = 0 past each row's length (an exact no-op step). T need not be a
multiple of the chunk: TMA zero-fills reads past the end and drops writes past it.

Decode: ``gated_delta_rule_step_mgpu`` (grid: Dv block x value head x batch), the state
tile [Dk, block_v] in float32 registers, S^T k and S^T q as column reductions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxpar.kernels_pallas.mgpu_common import (
    UnsupportedShapeError,
    check_smem,
    interpret_params,
    require_16bit,
    require_multiple,
    tile_transforms,
)

__all__ = ["chunk_gated_delta_rule_mgpu", "gated_delta_rule_step_mgpu"]

_L2_EPS = 1e-6
_CHUNK = 64  # wgmma row tile; the blocked inverse below is written for 4 blocks of 16
_SUB = 16  # diagonal block of the triangular inverse
_WGMMA = plgpu.Layout.WGMMA
_ROWS = plgpu.Layout.WGMMA.reduce(1)  # a vector indexed by row, broadcast along columns
_COLS = plgpu.Layout.WGMMA.reduce(0)  # a vector indexed by column, broadcast along rows


def _l2norm(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + _L2_EPS)


def _iota(shape, dim, layout=_WGMMA):
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=layout)


def _rows(vec, shape):
    """[R] row-indexed vector -> [R, N] (constant along each row)."""
    return lax.broadcast_in_dim(vec, shape, [0])


def _cols(vec, shape):
    """[N] column-indexed vector -> [R, N] (constant down each column)."""
    return lax.broadcast_in_dim(vec, shape, [1])


def _load_rows_and_cols(vec_smem):
    """A [C] shared-memory vector in both register layouts (row- and column-indexed).

    The second load goes through a (full) slice: Mosaic's layout inference wants every
    register access to one shared-memory value in a single layout.
    """
    n = vec_smem.shape[0]
    return (
        plgpu.load(vec_smem, layout=_ROWS),
        plgpu.load(vec_smem.at[pl.ds(0, n)], layout=_COLS),
    )


def _mma(shape, *pairs):
    """sum of a @ b over (a, b) shared-memory operand pairs, one float32 accumulator."""

    def body(acc_ref):
        for a, b in pairs:
            plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _store_split(x, hi_ref, lo_ref):
    """float32 registers -> hi + lo bf16 tiles with hi + lo = x to ~2^-16 relative."""
    hi = x.astype(jnp.bfloat16)
    hi_ref[...] = hi
    lo_ref[...] = (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)
    plgpu.commit_smem()  # register stores before the tensor cores (async proxy) read them


def _mma_split(shape, a, b):
    """a @ b for float32 operands stored as (hi, lo) bf16 pairs of refs: three wgmmas
    (hi.hi + hi.lo + lo.hi), near-float32 accuracy from the bf16 tensor cores."""
    (a_hi, a_lo), (b_hi, b_lo) = a, b
    return _mma(shape, (a_hi, b_hi), (a_hi, b_lo), (a_lo, b_hi))


def _t(ref):
    return ref.transpose((1, 0))


# ----------------------------------------------------------------- chunked: prepare


def _unit_lower_inverse(a, x_split, l_split, n_split, m_split):
    """X = (I + A)^-1 for the strictly lower-triangular float32 tile a [C, C] (registers).

    The *_split arguments are (hi, lo) pairs of [C, C] bf16 swizzled shared-memory tiles.
    Returns X [C, C] float32 (registers).
    """
    c = _CHUNK
    shape = (c, c)
    row, col = _iota(shape, 0), _iota(shape, 1)
    same_block = (row // _SUB) == (col // _SUB)
    eye = (row == col).astype(jnp.float32)

    # 1. Diagonal blocks. Y = X_d^T is built column by column: column i of Y is row i of
    #    X_d = e_i - sum_{j<i} A_ij X_d[j], i.e. Y[:, i] = e_i - Y a_i^T (a row reduction).
    #    Step r does column r of all four 16-blocks at once: Y stays block diagonal, so one
    #    combined vector c[j] = A[16 * block(j) + r, j] (a column reduction of the masked
    #    A) serves every block.
    def diag_step(r, y):
        a_rows = jnp.sum(jnp.where(row == (col // _SUB) * _SUB + r, a, 0.0), axis=0)
        prod = jnp.sum(y * _cols(a_rows, shape), axis=1)
        return jnp.where(same_block & (col % _SUB == r), eye - _rows(prod, shape), y)

    y = lax.fori_loop(0, _SUB, diag_step, plgpu.layout_cast(eye, _WGMMA))

    # 2. Off-diagonal blocks: (I + A) = (I + D)(I + X_d L) with L the strictly block-lower
    #    part of A, N = X_d L is nilpotent (N^4 = 0), so X = (I - N + N^2 - N^3) X_d.
    _store_split(y, *x_split)
    x_d = tuple(_t(r) for r in x_split)  # Y^T = X_d, a transposed operand view
    _store_split(jnp.where(row // _SUB > col // _SUB, a, 0.0), *l_split)
    n = _mma_split(shape, x_d, l_split)
    _store_split(n, *n_split)
    _store_split(n, *m_split)  # wgmma cannot take one buffer as both operands
    n2 = _mma_split(shape, n_split, m_split)
    _store_split(n2, *m_split)
    n3 = _mma_split(shape, m_split, n_split)
    _store_split(eye - n + n2 - n3, *n_split)  # N is no longer needed
    return _mma_split(shape, n_split, x_d)


def _prepare_kernel(
    k_ref, v_ref, g_ref, beta_ref, w_ref, u_ref,
    k_smem, v_smem, g_smem, beta_smem, s0, s1, s2, s3, s4, s5, s6, s7, x_smem, bars,
    *, ratio,
):  # fmt: skip
    """One (chunk, value head, batch row): W = X (beta exp(G) K), U = X (beta V)."""
    n, head, row = (lax.axis_index(a) for a in ("chunks", "heads", "batch"))
    c = _CHUNK
    rows = pl.ds(n * c, c)
    plgpu.copy_gmem_to_smem(k_ref.at[row, rows, lax.div(head, jnp.int32(ratio))], k_smem,
                            bars.at[0])  # fmt: skip
    plgpu.copy_gmem_to_smem(v_ref.at[row, rows, head], v_smem, bars.at[1])
    plgpu.copy_gmem_to_smem(g_ref.at[row, head, rows], g_smem, bars.at[2])
    plgpu.copy_gmem_to_smem(beta_ref.at[row, head, rows], beta_smem, bars.at[3])
    for i in range(4):
        plgpu.barrier_wait(bars.at[i])

    shape = (c, c)
    row_i, col_j = _iota(shape, 0), _iota(shape, 1)
    g_row, g_col = _load_rows_and_cols(g_smem)
    beta_row = plgpu.load(beta_smem, layout=_ROWS)
    kk = _mma(shape, (k_smem, _t(k_smem)))
    # Mask before exp: above the diagonal G_i - G_j > 0 could overflow.
    decay = jnp.exp(jnp.where(row_i >= col_j, _rows(g_row, shape) - _cols(g_col, shape),
                              -jnp.inf))  # fmt: skip
    a = jnp.where(row_i > col_j, _rows(beta_row, shape) * kk * decay, 0.0)
    x = _unit_lower_inverse(a, (s0, s1), (s2, s3), (s4, s5), (s6, s7))

    dtype = k_smem.dtype
    x_smem[...] = x.astype(dtype)  # X in the input dtype, the A operand of W and U
    k = plgpu.load(k_smem, layout=_WGMMA).astype(jnp.float32)
    kb = k * _rows(beta_row * jnp.exp(g_row), k.shape)
    k_smem[...] = kb.astype(dtype)
    v = plgpu.load(v_smem, layout=_WGMMA).astype(jnp.float32)
    v_smem[...] = (v * _rows(beta_row, v.shape)).astype(dtype)
    plgpu.commit_smem()
    w = _mma(k.shape, (x_smem, k_smem))
    u = _mma(v.shape, (x_smem, v_smem))
    k_smem[...] = w.astype(dtype)  # the operands are consumed: their tiles hold W and U
    v_smem[...] = u.astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_smem, w_ref.at[row, rows, head])
    plgpu.copy_smem_to_gmem(v_smem, u_ref.at[row, rows, head])
    plgpu.wait_smem_to_gmem(0)


# ------------------------------------------------------------------- chunked: state


def _state_kernel(
    w_ref, u_ref, k_ref, g_ref, s0_ref, vn_ref, h_ref, sf_ref,
    kd_smem, vn_smem, h_smem, s_smem, bar,
    *, ratio, block_v, num_chunks, max_concurrent_steps, in_place,
):  # fmt: skip
    """One (Dv block, value head, batch row): the serial pass over chunks carrying S.

    Inputs stream through ``emit_pipeline``; the two per-chunk outputs (V_new and H_n)
    leave through a 2-slot ring of shared-memory tiles with TMA stores, a slot being
    reused only once the stores issued from it two chunks earlier have read it.
    """
    vb, head, row = (lax.axis_index(a) for a in ("v_blocks", "heads", "batch"))
    c = _CHUNK
    dk = k_ref.shape[-1]
    dtype = kd_smem.dtype
    vcols = pl.ds(vb * block_v, block_v)
    plgpu.copy_gmem_to_smem(s0_ref.at[row, head, :, vcols], s_smem, bar)
    plgpu.barrier_wait(bar)
    state = plgpu.load(s_smem, layout=_WGMMA)

    def step(idx, w_smem, u_smem, k_smem, g_smem, s):
        (n,) = idx
        slot = lax.rem(n, 2)
        h_out, vn_out = h_smem.at[slot], vn_smem.at[slot]
        plgpu.wait_smem_to_gmem(2, wait_read_only=True)  # chunk n - 2's stores of this slot
        # H_n = S at the chunk start: stored, and the B operand of W S.
        h_out[...] = s.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(h_out, h_ref.at[row, head, n, :, vcols])
        v_new = plgpu.load(u_smem, layout=_WGMMA).astype(jnp.float32)
        v_new = v_new - _mma(v_new.shape, (w_smem, h_out))
        vn_out[...] = v_new.astype(dtype)
        g_row = plgpu.load(g_smem, layout=_ROWS)
        g_last = g_smem[c - 1]
        k = plgpu.load(k_smem, layout=_WGMMA).astype(jnp.float32)
        kd_smem[...] = (k * _rows(jnp.exp(g_last - g_row), k.shape)).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(vn_out, vn_ref.at[row, pl.ds(n * c, c), head, vcols])
        s = s * jnp.exp(g_last)
        if in_place:  # compiled: wgmma accumulates into S itself, one state tile live
            return pl.run_state(lambda acc: plgpu.wgmma(acc, _t(kd_smem), vn_out))(
                plgpu.ACC.init(s)
            )
        return s + _mma(s.shape, (_t(kd_smem), vn_out))  # interpret mode has no run_state

    k_tiles = tile_transforms(dk, dtype)
    state = plgpu.emit_pipeline(
        step,
        grid=(num_chunks,),
        in_specs=[
            plgpu.BlockSpec((c, dk), lambda n: (n, 0), transforms=k_tiles),
            plgpu.BlockSpec((c, block_v), lambda n: (n, vb),
                            transforms=tile_transforms(block_v, dtype)),  # fmt: skip
            plgpu.BlockSpec((c, dk), lambda n: (n, 0), transforms=k_tiles),
            plgpu.BlockSpec((c,), lambda n: (n,)),
        ],
        max_concurrent_steps=max_concurrent_steps,
        init_carry=state,
    )(
        w_ref.at[row, :, head],
        u_ref.at[row, :, head],
        k_ref.at[row, :, lax.div(head, jnp.int32(ratio))],
        g_ref.at[row, head],
    )
    s_smem[...] = state
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(s_smem, sf_ref.at[row, head, :, vcols])
    plgpu.wait_smem_to_gmem(0)


# ------------------------------------------------------------------ chunked: output


def _output_kernel(
    len_ref, q_ref, k_ref, g_ref, h_ref, vn_ref, o_ref,
    q_smem, k_smem, g_smem, h_smem, vn_smem, p_smem, bars, *, ratio,
):  # fmt: skip
    """One (chunk, value head, batch row): O = (Q exp(G)) H_n + (tril(Q K^T) Gamma) V_new."""
    n, head, row = (lax.axis_index(a) for a in ("chunks", "heads", "batch"))
    c = _CHUNK
    rows = pl.ds(n * c, c)
    key_head = lax.div(head, jnp.int32(ratio))
    plgpu.copy_gmem_to_smem(q_ref.at[row, rows, key_head], q_smem, bars.at[0])
    plgpu.copy_gmem_to_smem(k_ref.at[row, rows, key_head], k_smem, bars.at[1])
    plgpu.copy_gmem_to_smem(g_ref.at[row, head, rows], g_smem, bars.at[2])
    plgpu.copy_gmem_to_smem(h_ref.at[row, head, n], h_smem, bars.at[3])
    plgpu.copy_gmem_to_smem(vn_ref.at[row, rows, head], vn_smem, bars.at[4])
    for i in range(5):
        plgpu.barrier_wait(bars.at[i])

    dtype = q_smem.dtype
    shape = (c, c)
    row_i, col_j = _iota(shape, 0), _iota(shape, 1)
    g_row, g_col = _load_rows_and_cols(g_smem)
    qk = _mma(shape, (q_smem, _t(k_smem)))
    causal = row_i >= col_j
    decay = jnp.exp(jnp.where(causal, _rows(g_row, shape) - _cols(g_col, shape), -jnp.inf))
    p_smem[...] = jnp.where(causal, qk * decay, 0.0).astype(dtype)
    q = plgpu.load(q_smem, layout=_WGMMA).astype(jnp.float32)
    q_smem[...] = (q * _rows(jnp.exp(g_row), q.shape)).astype(dtype)
    plgpu.commit_smem()
    dv = vn_smem.shape[-1]
    o = _mma((c, dv), (q_smem, h_smem), (p_smem, vn_smem))
    t_pos = n * c + _iota((c,), 0, _ROWS)
    o = jnp.where(_rows(t_pos < len_ref[row], o.shape), o, 0.0)
    vn_smem[...] = o.astype(dtype)  # V_new is consumed: its tile holds O
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(vn_smem, o_ref.at[row, rows, head])
    plgpu.wait_smem_to_gmem(0)


# --------------------------------------------------------------------- launches
# Shapes: k [B, T8, Hk, Dk] and v [B, T8, Hv, Dv] (T8: T padded to a multiple of 8),
# g (in-chunk cumulative) and beta [B, Hv, N * C] float32.

_COMPILER = dict(approx_math=True)


def _tiles(d, dtype):
    return tile_transforms(d, dtype)


def _prepare_call(k, v, g, beta, *, ratio, params):
    b, tp, hv, dv = v.shape
    dk, dtype, c = k.shape[-1], v.dtype, _CHUNK
    bf16 = jnp.bfloat16
    square = lambda: plgpu.SMEM((c, c), bf16, transforms=_tiles(c, bf16))  # noqa: E731
    return plgpu.kernel(
        lambda *refs: _prepare_kernel(*refs, ratio=ratio),
        out_type=(
            jax.ShapeDtypeStruct((b, tp, hv, dk), dtype),
            jax.ShapeDtypeStruct((b, tp, hv, dv), dtype),
        ),
        scratch_types=[
            plgpu.SMEM((c, dk), dtype, transforms=_tiles(dk, dtype)),
            plgpu.SMEM((c, dv), dtype, transforms=_tiles(dv, dtype)),
            plgpu.SMEM((c,), jnp.float32),
            plgpu.SMEM((c,), jnp.float32),
            *[square() for _ in range(8)],
            plgpu.SMEM((c, c), dtype, transforms=_tiles(c, dtype)),
            plgpu.Barrier(num_barriers=4),
        ],
        grid=(g.shape[-1] // c, hv, b),
        grid_names=("chunks", "heads", "batch"),
        compiler_params=plgpu.CompilerParams(**_COMPILER),
        interpret=params,
        kernel_name="jaxpar_gdn_prepare_mgpu",
    )(k, v, g, beta)


def _state_call(w, u, k, g, s0, *, ratio, block_v, max_concurrent_steps, params):
    b, tp, hv, dv = u.shape
    dk, dtype, c = k.shape[-1], u.dtype, _CHUNK
    num_chunks = g.shape[-1] // c
    return plgpu.kernel(
        lambda *refs: _state_kernel(
            *refs, ratio=ratio, block_v=block_v, num_chunks=num_chunks,
            max_concurrent_steps=max_concurrent_steps, in_place=params is None,
        ),  # fmt: skip
        out_type=(
            jax.ShapeDtypeStruct((b, tp, hv, dv), dtype),
            jax.ShapeDtypeStruct((b, hv, num_chunks, dk, dv), dtype),
            jax.ShapeDtypeStruct((b, hv, dk, dv), jnp.float32),
        ),
        scratch_types=[
            plgpu.SMEM((c, dk), dtype, transforms=_tiles(dk, dtype)),
            plgpu.SMEM((2, c, block_v), dtype, transforms=_tiles(block_v, dtype)),
            plgpu.SMEM((2, dk, block_v), dtype, transforms=_tiles(block_v, dtype)),
            plgpu.SMEM((dk, block_v), jnp.float32, transforms=_tiles(block_v, jnp.float32)),
            plgpu.Barrier(),
        ],
        grid=(dv // block_v, hv, b),
        grid_names=("v_blocks", "heads", "batch"),
        compiler_params=plgpu.CompilerParams(**_COMPILER),
        interpret=params,
        kernel_name="jaxpar_gdn_state_mgpu",
    )(w, u, k, g, s0)


def _output_call(lengths, q, k, g, hs, v_new, *, ratio, params):
    b, tp, hv, dv = v_new.shape
    dk, dtype, c = k.shape[-1], v_new.dtype, _CHUNK
    return plgpu.kernel(
        lambda *refs: _output_kernel(*refs, ratio=ratio),
        out_type=jax.ShapeDtypeStruct((b, tp, hv, dv), dtype),
        scratch_types=[
            plgpu.SMEM((c, dk), dtype, transforms=_tiles(dk, dtype)),
            plgpu.SMEM((c, dk), dtype, transforms=_tiles(dk, dtype)),
            plgpu.SMEM((c,), jnp.float32),
            plgpu.SMEM((dk, dv), dtype, transforms=_tiles(dv, dtype)),
            plgpu.SMEM((c, dv), dtype, transforms=_tiles(dv, dtype)),
            plgpu.SMEM((c, c), dtype, transforms=_tiles(c, dtype)),
            plgpu.Barrier(num_barriers=5),
        ],
        grid=(g.shape[-1] // c, hv, b),
        grid_names=("chunks", "heads", "batch"),
        compiler_params=plgpu.CompilerParams(**_COMPILER),
        interpret=params,
        kernel_name="jaxpar_gdn_output_mgpu",
    )(lengths, q, k, g, hs, v_new)


# --------------------------------------------------------------------------- wrapper


def _check_gdn_shapes(q, k, v, g, beta, chunk_size, block_v, max_concurrent_steps):
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {q.shape} and {k.shape}")
    b, t, hk, dk = k.shape
    if v.shape[:2] != (b, t):
        raise ValueError(f"v {v.shape} must share [B, T] with k {k.shape}")
    hv, dv = v.shape[2:]
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (b, t, hv):
            raise ValueError(f"{name} must be [B, T, Hv]={(b, t, hv)}, got {x.shape}")
    if hv % hk:
        raise UnsupportedShapeError(f"value heads Hv={hv} must be a multiple of key heads {hk}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        require_16bit(name, x.dtype)
    if not (q.dtype == k.dtype == v.dtype):
        raise UnsupportedShapeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if chunk_size != _CHUNK:
        raise UnsupportedShapeError(
            f"chunk_size={chunk_size} is not supported by the Mosaic GPU kernel: it must be "
            f"{_CHUNK} (one wgmma row tile; the blocked inverse uses 4 blocks of {_SUB})"
        )
    for name, d in (("key head_dim Dk", dk), ("value head_dim Dv", dv)):
        require_multiple(name, d, 64, "128-byte swizzled bf16 rows")
        if d > 256:
            raise UnsupportedShapeError(f"{name}={d} must be <= 256 (wgmma N limit)")
    require_multiple("block_v", block_v, 64, "128-byte swizzled bf16 rows")
    require_multiple("value head_dim Dv", dv, block_v, f"whole block_v={block_v} tiles")
    c, item = _CHUNK, 2
    check_smem("GDN prepare", (c * dk + c * dv + 9 * c * c) * item + 2 * c * 4, "Dk + Dv too large")
    check_smem(
        "GDN state pass",
        (c * dk + 2 * c * block_v + 2 * dk * block_v) * item + dk * block_v * 4
        + max_concurrent_steps * ((2 * c * dk + c * block_v) * item + c * 4),
        "lower block_v or max_concurrent_steps",
    )  # fmt: skip
    check_smem("GDN output", (2 * c * dk + dk * dv + c * dv + c * c) * item + c * 4,
               "Dk * Dv too large")  # fmt: skip
    return hv // hk


def chunk_gated_delta_rule_mgpu(
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
    block_v: int = 64,
    max_concurrent_steps: int = 2,
    interpret=False,
) -> tuple[jax.Array, jax.Array]:
    """Chunked gated delta rule on Hopper. Same contract as
    ``gated_delta_rule.chunk_gated_delta_rule``.

    q, k: [B, T, Hk, Dk]; v: [B, T, Hv, Dv] (bf16 or f16, one dtype); g, beta: [B, T, Hv];
    initial_state: [B, Hv, Dk, Dv] float32 or None; lengths: [B] int32 or None.
    Returns (o [B, T, Hv, Dv] in v.dtype, final_state [B, Hv, Dk, Dv] float32).
    chunk_size must be 64; Dk, Dv multiples of 64 up to 256; block_v (the state pass's
    Dv tile, 64 or 128) divides Dv.
    """
    ratio = _check_gdn_shapes(q, k, v, g, beta, chunk_size, block_v, max_concurrent_steps)
    b, t, hv, dv = v.shape
    dk = k.shape[-1]
    dtype = v.dtype
    c = _CHUNK
    params = interpret_params(interpret)
    scale = dk**-0.5 if scale is None else scale
    if initial_state is not None and initial_state.shape != (b, hv, dk, dv):
        raise ValueError(
            f"initial_state must be [B, Hv, Dk, Dv]={(b, hv, dk, dv)}, got {initial_state.shape}"
        )

    with jax.named_scope("gdn_mgpu_inputs"):
        g = g.astype(jnp.float32)
        beta = beta.astype(jnp.float32)
        if lengths is not None:  # g = beta = 0 past the length: exact no-op steps
            valid = jnp.arange(t)[None, :] < lengths[:, None]
            g = jnp.where(valid[..., None], g, 0.0)
            beta = jnp.where(valid[..., None], beta, 0.0)
        lengths = jnp.full((b,), t, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
        qf = _l2norm(q) if use_qk_l2norm else q.astype(jnp.float32)
        q = (qf * scale).astype(dtype)
        k = (_l2norm(k) if use_qk_l2norm else k).astype(dtype)
        # TMA addresses swizzled tiles by 8 rows: T is padded to a multiple of 8 (rare).
        pad8 = -t % 8
        if pad8:
            pad = lambda x: jnp.pad(x, [(0, 0), (0, pad8)] + [(0, 0)] * (x.ndim - 2))
            q, k, v = pad(q), pad(k), pad(v)
        num_chunks = pl.cdiv(t, c)
        tc = num_chunks * c
        # In-chunk cumulative log decay and beta as [B, Hv, N * C]: per head, contiguous.
        g = jnp.pad(g, ((0, 0), (0, tc - t), (0, 0)))
        beta = jnp.pad(beta, ((0, 0), (0, tc - t), (0, 0)))
        g = jnp.cumsum(g.reshape(b, num_chunks, c, hv), axis=2).reshape(b, tc, hv)
        g, beta = jnp.swapaxes(g, 1, 2), jnp.swapaxes(beta, 1, 2)
        s0 = (
            jnp.zeros((b, hv, dk, dv), jnp.float32)
            if initial_state is None
            else initial_state.astype(jnp.float32)
        )
    with jax.named_scope("gdn_mgpu_prepare"):
        w, u = _prepare_call(k, v, g, beta, ratio=ratio, params=params)
    with jax.named_scope("gdn_mgpu_state"):
        v_new, hs, state = _state_call(
            w, u, k, g, s0, ratio=ratio, block_v=block_v,
            max_concurrent_steps=max_concurrent_steps, params=params,
        )  # fmt: skip
    with jax.named_scope("gdn_mgpu_output"):
        o = _output_call(lengths, q, k, g, hs, v_new, ratio=ratio, params=params)
    return o[:, :t], state


# ---------------------------------------------------------------------------- decode


def _step_kernel(
    g_ref, beta_ref, q_ref, k_ref, v_ref, s_ref, o_ref, s_out_ref,
    q_smem, k_smem, v_smem, s_smem, o_smem, bars, *, ratio, block_v,
):  # fmt: skip
    """One (Dv block, value head, batch row) decode token on the state tile [Dk, block_v].

    S^T k and S^T q are column reductions of the float32 register tile; the rank-1 update
    k delta^T is a broadcast product. q and k arrive l2-normalised (q also scaled).
    """
    vb, head, row = (lax.axis_index(a) for a in ("v_blocks", "heads", "batch"))
    key_head = lax.div(head, jnp.int32(ratio))
    vcols = pl.ds(vb * block_v, block_v)
    plgpu.copy_gmem_to_smem(s_ref.at[row, head, :, vcols], s_smem, bars.at[0])
    plgpu.copy_gmem_to_smem(q_ref.at[row, key_head], q_smem, bars.at[1])
    plgpu.copy_gmem_to_smem(k_ref.at[row, key_head], k_smem, bars.at[2])
    plgpu.copy_gmem_to_smem(v_ref.at[row, head, vcols], v_smem, bars.at[3])
    for i in range(4):
        plgpu.barrier_wait(bars.at[i])
    s = plgpu.load(s_smem, layout=_WGMMA) * jnp.exp(g_ref[row, head])
    k = _rows(plgpu.load(k_smem, layout=_ROWS), s.shape)
    q = _rows(plgpu.load(q_smem, layout=_ROWS), s.shape)
    v = plgpu.load(v_smem, layout=_COLS)
    delta = beta_ref[row, head] * (v - jnp.sum(s * k, axis=0))
    s = s + k * _cols(delta, s.shape)
    o_smem[...] = jnp.sum(s * q, axis=0).astype(o_smem.dtype)
    s_smem[...] = s
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[row, head, vcols])
    plgpu.copy_smem_to_gmem(s_smem, s_out_ref.at[row, head, :, vcols])
    plgpu.wait_smem_to_gmem(0)


def gated_delta_rule_step_mgpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    state: jax.Array,
    *,
    use_qk_l2norm: bool = True,
    scale: float | None = None,
    block_v: int = 64,
    interpret=False,
) -> tuple[jax.Array, jax.Array]:
    """One decode token on Hopper. Same contract as ``gated_delta_rule.gated_delta_rule_step``.

    q, k: [B, Hk, Dk]; v: [B, Hv, Dv]; g, beta: [B, Hv]; state: [B, Hv, Dk, Dv] float32.
    Returns (o [B, Hv, Dv] in v.dtype, new_state float32). Grid: (Dv / block_v, Hv, B);
    the state tile moves by TMA (HBM-bound: the state is read and written once). The new
    state is a new buffer (``plgpu.kernel`` has no input/output aliasing).
    """
    b, hk, dk = k.shape
    hv, dv = v.shape[1], v.shape[2]
    if q.shape != k.shape or v.shape[0] != b:
        raise ValueError(f"bad GDN decode shapes q{q.shape} k{k.shape} v{v.shape}")
    if hv % hk:
        raise UnsupportedShapeError(f"value heads Hv={hv} must be a multiple of key heads {hk}")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (b, hv):
            raise ValueError(f"{name} must be [B, Hv]={(b, hv)}, got {x.shape}")
    if state.shape != (b, hv, dk, dv):
        raise ValueError(f"state must be [B, Hv, Dk, Dv]={(b, hv, dk, dv)}, got {state.shape}")
    require_multiple("key head_dim Dk", dk, 64, "64-row register tiles of the state")
    require_multiple("block_v", block_v, 32, "128-byte swizzled float32 rows")
    require_multiple("value head_dim Dv", dv, block_v, f"whole block_v={block_v} tiles")
    params = interpret_params(interpret)
    scale = dk**-0.5 if scale is None else scale
    with jax.named_scope("gdn_mgpu_step_inputs"):
        qf = _l2norm(q) if use_qk_l2norm else q.astype(jnp.float32)
        kf = _l2norm(k) if use_qk_l2norm else k.astype(jnp.float32)
        args = (g.astype(jnp.float32), beta.astype(jnp.float32), qf * scale, kf,
                v.astype(jnp.float32), state.astype(jnp.float32))  # fmt: skip
    s_tiles = tile_transforms(block_v, jnp.float32)
    o_dtype = v.dtype if jnp.dtype(v.dtype).itemsize >= 2 else jnp.float32
    return plgpu.kernel(
        lambda *refs: _step_kernel(*refs, ratio=hv // hk, block_v=block_v),
        out_type=(
            jax.ShapeDtypeStruct((b, hv, dv), o_dtype),
            jax.ShapeDtypeStruct((b, hv, dk, dv), jnp.float32),
        ),
        scratch_types=[
            plgpu.SMEM((dk,), jnp.float32),
            plgpu.SMEM((dk,), jnp.float32),
            plgpu.SMEM((block_v,), jnp.float32),
            plgpu.SMEM((dk, block_v), jnp.float32, transforms=s_tiles),
            plgpu.SMEM((block_v,), o_dtype),
            plgpu.Barrier(num_barriers=4),
        ],
        grid=(dv // block_v, hv, b),
        grid_names=("v_blocks", "heads", "batch"),
        compiler_params=plgpu.CompilerParams(**_COMPILER),
        interpret=params,
        kernel_name="jaxpar_gdn_decode_step_mgpu",
    )(*args)
