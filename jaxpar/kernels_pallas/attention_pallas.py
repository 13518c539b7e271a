"""Pallas (Triton backend) GPU attention kernels: causal flash prefill and split-KV decode
with log-sum-exp output. Same contracts as :mod:`jaxpar.kernels_pallas.attention`, plus
``interpret`` (run the kernel body through the Pallas interpreter, e.g. on CPU) and block
sizes.

Triton needs every tensor inside a kernel to have power-of-two dimensions and ``tl.dot``
needs each matmul dimension >= 16, so head_dim and block sizes must be powers of two >= 16.
Query-head groups in decode are zero-padded up to 16 rows. Shapes a kernel cannot take raise
:class:`UnsupportedShapeError` naming the shape and the rule; nothing falls back silently.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jaxpar.kernels_pallas.attention import merge_attention_partials

__all__ = [
    "UnsupportedShapeError",
    "require_power_of_two",
    "triton_params",
    "mm",
    "prefill_attention_pallas",
    "decode_attention_pallas",
]

# Finite stand-in for -inf inside kernels: exp(MASK - m) underflows to 0 for any real m and
# never produces inf - inf = NaN in the online softmax.
_MASK = -0.7 * float(jnp.finfo(jnp.float32).max)


class UnsupportedShapeError(ValueError):
    """A Pallas kernel cannot handle these shapes (the message names shape and rule)."""


def require_power_of_two(what: str, value: int, minimum: int = 16) -> None:
    """Raises UnsupportedShapeError unless value is a power of two >= minimum."""
    if value < minimum or value & (value - 1):
        raise UnsupportedShapeError(
            f"{what}={value} is not supported by the Pallas Triton kernel: it must be a power "
            f"of two >= {minimum} (Triton tensors need power-of-two sizes and tl.dot needs "
            f"dimensions >= 16). Use impl='reference' for this shape."
        )


def triton_params(num_warps: int, num_stages: int) -> plt.CompilerParams:
    """Triton compiler params. Passing them also pins pallas_call to the Triton backend
    (without them JAX may pick Mosaic GPU, which lacks some ops these kernels use)."""
    return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def mm(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False):
    """2-D matmul with float32 accumulation inside a kernel.

    float32 operands use IEEE float32 (Precision.HIGHEST) so kernels match the float32
    references; bf16/f16 operands use tensor-core MMA with float32 accumulation.
    """
    dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


# ------------------------------------------------------------------------------ prefill


def _prefill_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, *, scale, causal, block_q, block_k):
    """One (batch, head, query block) program. q_ref: [block_q, D]; k_ref, v_ref: [T, D]."""
    qi = pl.program_id(2)
    length = len_ref[...]
    q = q_ref[...]
    q_pos = qi * block_q + jnp.arange(block_q)

    def body(j, carry):
        acc, m, l = carry
        k = k_ref[pl.ds(j * block_k, block_k), :]
        v = v_ref[pl.ds(j * block_k, block_k), :]
        s = mm(q, k, trans_b=True) * scale  # [block_q, block_k] f32
        k_pos = j * block_k + jnp.arange(block_k)
        mask = k_pos[None, :] < length
        if causal:
            mask = mask & (q_pos[:, None] >= k_pos[None, :])
        s = jnp.where(mask, s, _MASK)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + mm(p.astype(v.dtype), v)
        return acc, m_new, l

    # Key blocks past the row length (and, if causal, past this query block) are skipped.
    n_blocks = pl.cdiv(length, block_k)
    if causal:
        n_blocks = jnp.minimum(n_blocks, pl.cdiv((qi + 1) * block_q, block_k))
    init = (
        jnp.zeros((block_q, q.shape[-1]), jnp.float32),
        jnp.full((block_q,), _MASK, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    acc, _, l = lax.fori_loop(0, n_blocks, body, init)
    # Padding query rows (and rows that saw no key) are written as zeros.
    valid = (q_pos < length) & (l > 0)
    o = jnp.where(valid[:, None], acc / jnp.where(valid, l, 1.0)[:, None], 0.0)
    o_ref[...] = o.astype(o_ref.dtype)


def prefill_attention_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    causal: bool = True,
    block_q: int = 64,
    block_k: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:
    """Flash-attention prefill. Same contract as ``attention.prefill_attention``.

    q: [B, T, H, D]; k, v: [B, T, KVH, D]; lengths: [B] int32. T is padded internally to a
    multiple of max(block_q, block_k) (padding keys are masked by ``lengths``).
    Grid: (batch, query head, query block); each program loops over key blocks with an
    online softmax in float32.
    """
    b, t, h, d = q.shape
    kvh = k.shape[2]
    if h % kvh:
        raise UnsupportedShapeError(f"query heads H={h} must be a multiple of KV heads {kvh}")
    require_power_of_two("head_dim", d)
    require_power_of_two("block_q", block_q)
    require_power_of_two("block_k", block_k)
    group = h // kvh

    pad = -t % max(block_q, block_k)
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    tp = t + pad
    kernel = functools.partial(
        _prefill_kernel, scale=scale, causal=causal, block_q=block_q, block_k=block_k
    )
    o = pl.pallas_call(
        kernel,
        grid=(b, h, tp // block_q),
        in_specs=[
            pl.BlockSpec((None,), lambda bi, hi, qi: (bi,)),
            pl.BlockSpec((None, block_q, None, d), lambda bi, hi, qi: (bi, qi, hi, 0)),
            pl.BlockSpec((None, tp, None, d), lambda bi, hi, qi: (bi, 0, hi // group, 0)),
            pl.BlockSpec((None, tp, None, d), lambda bi, hi, qi: (bi, 0, hi // group, 0)),
        ],
        out_specs=pl.BlockSpec((None, block_q, None, d), lambda bi, hi, qi: (bi, qi, hi, 0)),
        out_shape=jax.ShapeDtypeStruct((b, tp, h, d), q.dtype),
        compiler_params=triton_params(num_warps, num_stages),
        interpret=interpret,
        name="jaxpar_prefill_attention",
    )(lengths.astype(jnp.int32), q, k, v)
    return o[:, :t]


# ------------------------------------------------------------------------------- decode


def _decode_kernel(
    len_ref, q_ref, k_ref, v_ref, *rest, scale, block_k, split_len, has_positions
):
    """One (batch, kv head, KV split) program.

    q_ref: [Gp, D] (the query heads of this kv head, zero-padded to Gp rows);
    k_ref, v_ref: [split_len, D]; optional pos_ref: [split_len] slot positions.
    Writes this split's normalised output [Gp, D] and lse [Gp] (-inf where no slot valid).
    """
    if has_positions:
        pos_ref, o_ref, lse_ref = rest
    else:
        pos_ref, (o_ref, lse_ref) = None, rest
    split = pl.program_id(2)
    kv_len = len_ref[...]
    q = q_ref[...]
    gp = q.shape[0]

    def body(j, carry):
        acc, m, l = carry
        k = k_ref[pl.ds(j * block_k, block_k), :]
        v = v_ref[pl.ds(j * block_k, block_k), :]
        if has_positions:
            pos = pos_ref[pl.ds(j * block_k, block_k)]
        else:
            pos = split * split_len + j * block_k + jnp.arange(block_k)
        s = mm(q, k, trans_b=True) * scale  # [Gp, block_k]
        s = jnp.where((pos < kv_len)[None, :], s, _MASK)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + mm(p.astype(v.dtype), v)
        return acc, m_new, l

    n_blocks = split_len // block_k
    if not has_positions:
        # Slots hold positions in order: blocks wholly past kv_len are skipped.
        n_blocks = jnp.clip(pl.cdiv(kv_len - split * split_len, block_k), 0, n_blocks)
    init = (
        jnp.zeros((gp, q.shape[-1]), jnp.float32),
        jnp.full((gp,), _MASK, jnp.float32),
        jnp.zeros((gp,), jnp.float32),
    )
    acc, m, l = lax.fori_loop(0, n_blocks, body, init)
    # m only rises above the mask value once a valid slot was seen.
    seen = m > 0.5 * _MASK
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = jnp.where(seen[:, None], acc / l_safe[:, None], 0.0)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)


def decode_attention_pallas(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    kv_lens: jax.Array,
    *,
    scale: float,
    slot_positions: jax.Array | None = None,
    block_k: int = 64,
    num_splits: int = 1,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Split-KV decode attention. Same contract as ``attention.decode_attention``.

    q: [B, H, D]; k_cache, v_cache: [B, S, KVH, D]; kv_lens: [B] int32; slot_positions:
    optional [S] int32. Returns (o [B, H, D] float32, lse [B, H] float32).
    Grid: (batch, kv head, split); each program handles all query heads of one kv head over
    S / num_splits slots; splits are merged by log-sum-exp. S must be a multiple of
    num_splits * block_k (the cache is not padded per step: that would copy it).
    """
    b, h, d = q.shape
    _, s_len, kvh, _ = k_cache.shape
    if h % kvh:
        raise UnsupportedShapeError(f"query heads H={h} must be a multiple of KV heads {kvh}")
    require_power_of_two("head_dim", d)
    require_power_of_two("block_k", block_k)
    if s_len % (num_splits * block_k):
        raise UnsupportedShapeError(
            f"KV cache length S={s_len} must be a multiple of num_splits * block_k = "
            f"{num_splits} * {block_k} for the Pallas decode kernel; choose a cache length "
            f"or block_k that divides, or use impl='reference'."
        )
    group = h // kvh
    gp = max(16, pl.next_power_of_2(group))  # tl.dot needs >= 16 rows
    split_len = s_len // num_splits

    qg = q.reshape(b, kvh, group, d)
    if gp != group:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gp - group), (0, 0)))
    has_positions = slot_positions is not None
    in_specs = [
        pl.BlockSpec((None,), lambda bi, hi, si: (bi,)),
        pl.BlockSpec((None, None, gp, d), lambda bi, hi, si: (bi, hi, 0, 0)),
        pl.BlockSpec((None, split_len, None, d), lambda bi, hi, si: (bi, si, hi, 0)),
        pl.BlockSpec((None, split_len, None, d), lambda bi, hi, si: (bi, si, hi, 0)),
    ]
    args = [kv_lens.astype(jnp.int32), qg, k_cache, v_cache]
    if has_positions:
        in_specs.append(pl.BlockSpec((split_len,), lambda bi, hi, si: (si,)))
        args.append(slot_positions.astype(jnp.int32))
    kernel = functools.partial(
        _decode_kernel,
        scale=scale,
        block_k=block_k,
        split_len=split_len,
        has_positions=has_positions,
    )
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, kvh, num_splits),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, None, gp, d), lambda bi, hi, si: (si, bi, hi, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda bi, hi, si: (si, bi, hi, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((num_splits, b, kvh, gp, d), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, b, kvh, gp), jnp.float32),
        ],
        compiler_params=triton_params(num_warps, num_stages),
        interpret=interpret,
        name="jaxpar_decode_attention",
    )(*args)
    if num_splits > 1:
        o, lse = merge_attention_partials(o, lse)
    else:
        o, lse = o[0], lse[0]
    o = o[:, :, :group].reshape(b, h, d)
    lse = lse[:, :, :group].reshape(b, h)
    return o, lse
