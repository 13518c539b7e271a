"""Pure-JAX reference implementations of the gated delta rule (Gated DeltaNet).

Per value head the recurrent state ``S`` is ``[Dk, Dv]`` (float32). With l2-normalised
``q``/``k`` (``q`` also scaled by ``Dk**-0.5``), one token does::

    S <- S * exp(g_t)
    delta = beta_t * (v_t - S^T k_t)
    S <- S + k_t delta^T
    o_t = S^T q_t

Three forms live here, all with float32 maths and outputs in ``v.dtype``:

* :func:`chunk_gated_delta_rule` -- the chunked WY/UT form: the
  intra-chunk work is batched over groups of chunks and only the chunk-to-chunk state
  carry is sequential (``lax.scan``). This is the prefill path.
* :func:`recurrent_gated_delta_rule` -- token-by-token ``lax.scan`` (the definition).
* :func:`gated_delta_rule_step` -- one decode token.

GQA: ``Hv`` is a multiple of ``Hk``; value head ``h`` reads key head ``h // (Hv // Hk)``
(``torch.repeat_interleave`` semantics, as in Hugging Face and vLLM).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "l2norm",
    "chunk_gated_delta_rule",
    "recurrent_gated_delta_rule",
    "gated_delta_rule_step",
]

# The reference is the numerical baseline: ask for true float32 matmuls even on GPU,
# where the default would be TF32.
_PRECISION = lax.Precision.HIGHEST
_L2_EPS = 1e-6


def l2norm(x: jax.Array, eps: float = _L2_EPS) -> jax.Array:
    """``x * rsqrt(sum(x^2, -1) + eps)`` in float32 (the FLA / Hugging Face convention)."""
    x = x.astype(jnp.float32)
    return x * lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def _check_shapes(q, k, v, g, beta) -> tuple[int, int]:
    """Validates [B, T, H, D] shapes and returns (Hk, heads-per-key-head ratio)."""
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {q.shape} and {k.shape}")
    batch, seq, hk, _ = k.shape
    if v.shape[:2] != (batch, seq):
        raise ValueError(f"v {v.shape} must share [B, T] with k {k.shape}")
    hv = v.shape[2]
    if hv % hk:
        raise ValueError(f"value heads Hv={hv} must be a multiple of key heads Hk={hk}")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (batch, seq, hv):
            raise ValueError(f"{name} must be [B, T, Hv]={(batch, seq, hv)}, got {x.shape}")
    return hk, hv // hk


def _prepare_qk(q, k, ratio: int, use_qk_l2norm: bool, scale: float | None):
    """float32, optional l2norm, query scaling and GQA head expansion of q/k.

    q, k: [..., Hk, Dk] -> [..., Hv, Dk] (head axis is -2).
    """
    q = q.astype(jnp.float32)
    k = k.astype(jnp.float32)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = q * (q.shape[-1] ** -0.5 if scale is None else scale)
    if ratio > 1:
        q = jnp.repeat(q, ratio, axis=-2)
        k = jnp.repeat(k, ratio, axis=-2)
    return q, k


def _mask_ragged(g, beta, lengths):
    """Sets g = beta = 0 (an exact no-op step) for positions t >= lengths[b].

    g, beta: [B, T, Hv]; lengths: [B] int32 or None. Returns (g, beta, valid [B, T] or None).
    """
    if lengths is None:
        return g, beta, None
    valid = jnp.arange(g.shape[1])[None, :] < lengths[:, None]
    g = jnp.where(valid[..., None], g, 0.0)
    beta = jnp.where(valid[..., None], beta, 0.0)
    return g, beta, valid


def _initial_state(initial_state, batch, hv, dk, dv):
    if initial_state is None:
        return jnp.zeros((batch, hv, dk, dv), jnp.float32)
    if initial_state.shape != (batch, hv, dk, dv):
        raise ValueError(
            f"initial_state must be [B, Hv, Dk, Dv]={(batch, hv, dk, dv)}, "
            f"got {initial_state.shape}"
        )
    return initial_state.astype(jnp.float32)


# ----------------------------------------------------------------------------- chunked


def _bmm(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """Batched matmul with one flattened batch dimension.

    XLA:CPU ran a dot with several batch dimensions ~2.5x slower than the same dot with one
    (measured on the chunk products here), so every chunk-level product goes through this.
    ``spec`` is a 3-operand einsum over (batch, rows, cols), e.g. "bij,bjd->bid"; a and b
    share their leading dims.
    """
    lead = a.shape[:-2]
    a3 = a.reshape(-1, *a.shape[-2:])
    b3 = b.reshape(-1, *b.shape[-2:])
    out = jnp.einsum(spec, a3, b3, precision=_PRECISION)
    return out.reshape(*lead, *out.shape[-2:])


def _to_chunks(x: jax.Array, chunk_size: int) -> jax.Array:
    """[B, T, H, ...] (T a multiple of C) -> chunk-major [N, B * H, C, ...].

    Chunk-major so the state scan reads its per-chunk slices without a transpose; batch and
    heads flattened (index b * H + h) so chunk products are single-batch-dim dots.
    """
    b, t, h = x.shape[:3]
    x = x.reshape(b, t // chunk_size, chunk_size, h, *x.shape[3:])
    x = jnp.moveaxis(x, (1, 2), (0, 3))  # [N, B, H, C, ...]
    return x.reshape(t // chunk_size, b * h, chunk_size, *x.shape[4:])


def _from_chunks(x: jax.Array, batch: int) -> jax.Array:
    """[N, B * H, C, D] -> [B, N * C, H, D]."""
    n, bh, c, d = x.shape
    x = jnp.moveaxis(x.reshape(n, batch, bh // batch, c, d), (0, 3), (1, 2))
    return x.reshape(batch, n * c, bh // batch, d)


def _key_to_value_heads(x: jax.Array, ratio: int) -> jax.Array:
    """[G, B * Hk, ...] -> [G, B * Hv, ...]: value head kh * R + r reads key head kh."""
    if ratio == 1:
        return x
    n, bhk = x.shape[:2]
    x = jnp.broadcast_to(x[:, :, None], (n, bhk, ratio, *x.shape[2:]))
    return x.reshape(n, bhk * ratio, *x.shape[3:])


def _unit_lower_inverse(a: jax.Array) -> jax.Array:
    """(I + A)^-1 for strictly lower-triangular A: [..., C, C] -> [..., C, C].

    Forward substitution, one row per step: row i of T = (I + A)^-1 is
    e_i - sum_{j<i} A_ij T_j. Rows >= i of T are still identity rows when row i is formed,
    and A_ij = 0 for j >= i, so a full-width vector-matrix product is exact. The inverse is
    then applied with batched matmuls. On CPU (T=2048, Hv=8, Dk=Dv=128, all chunks at once)
    this took ~4.5 ms against ~28 ms for ``solve_triangular`` on the (Dk + Dv)-wide
    right-hand side.
    """
    lead, c = a.shape[:-2], a.shape[-1]
    a = a.reshape(-1, c, c)
    eye = jnp.eye(c, dtype=a.dtype)

    def row(i, t):
        a_i = lax.dynamic_slice_in_dim(a, i, 1, axis=1)  # [batch, 1, C]
        t_i = eye[i] - jnp.einsum("bij,bjk->bik", a_i, t, precision=_PRECISION)
        return lax.dynamic_update_slice_in_dim(t, t_i, i, axis=1)

    t = lax.fori_loop(1, c, row, jnp.broadcast_to(eye, a.shape))
    return t.reshape(*lead, c, c)


def _intra_chunk(q, k, v, g, beta) -> dict:
    """Everything that does not depend on the carried state, for a group of chunks at once.

    q, k: [G, B*Hk, C, Dk]; v: [G, B*Hv, C, Dv]; g, beta: [G, B*Hv, C] (float32).
    q.k and k.k are computed once per key head, then broadcast to its value heads.
    Returns a dict of [G, B*Hv, ...] tensors for :func:`_state_pass`.
    """
    c = g.shape[-1]
    ratio = v.shape[1] // k.shape[1]
    # Cumulative log-decay inside each chunk: G_i = sum_{s <= i} g_s.
    big_g = jnp.cumsum(g, axis=-1)
    causal = jnp.tril(jnp.ones((c, c), dtype=bool))
    # Gamma_ij = exp(G_i - G_j) for i >= j. Mask *before* exp: G_i - G_j > 0 above the
    # diagonal and could overflow.
    gamma = jnp.exp(jnp.where(causal, big_g[..., :, None] - big_g[..., None, :], -jnp.inf))

    with jax.named_scope("gdn_qk_kk"):
        # One dot for both products: [q; k] k^T -> [2C, C] per chunk and key head.
        qk_kk = _bmm("bid,bjd->bij", jnp.concatenate([q, k], axis=-2), k)
        qk_kk = _key_to_value_heads(qk_kk, ratio)
        qk, kk = qk_kk[..., :c, :], qk_kk[..., c:, :]
        k = _key_to_value_heads(k, ratio)
        q = _key_to_value_heads(q, ratio)

    with jax.named_scope("gdn_ut_transform"):
        strict = jnp.tril(jnp.ones((c, c), dtype=bool), -1)
        a = jnp.where(strict, beta[..., :, None] * kk * gamma, 0.0)
        t_inv = _unit_lower_inverse(a)
        # U = T (beta V) and W = T (beta exp(G) K).
        u = _bmm("bij,bjd->bid", t_inv, v * beta[..., None])
        w = _bmm("bij,bjd->bid", t_inv, k * (beta * jnp.exp(big_g))[..., None])

    g_last = big_g[..., -1:]
    return dict(
        u=u,
        w=w,
        q_decayed=q * jnp.exp(big_g)[..., None],
        attn=qk * gamma,  # gamma is already zero above the diagonal
        # Stored transposed ([Dk, C]) so the state update is a plain (non-transposed) dot,
        # which XLA:CPU runs through its fast matmul path.
        k_decayed_t=jnp.swapaxes(k * jnp.exp(g_last - big_g)[..., None], -1, -2),
        chunk_decay=jnp.exp(g_last)[..., None],
    )


def _state_pass(parts: dict, state: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The sequential part: carry the state across the chunks of a group, emitting outputs.

    parts: :func:`_intra_chunk` outputs ([G, B*Hv, ...], chunk axis first);
    state: [B*Hv, Dk, Dv]. Returns (o [G, B*Hv, C, Dv], state after the group).
    """

    def step(s, x):
        # Vn = U - W S: the part of the chunk's values the state does not already predict.
        v_new = x["u"] - _bmm("bck,bkv->bcv", x["w"], s)
        o = _bmm("bck,bkv->bcv", x["q_decayed"], s) + _bmm("bij,bjv->biv", x["attn"], v_new)
        s = s * x["chunk_decay"] + _bmm("bkc,bcv->bkv", x["k_decayed_t"], v_new)
        return s, o

    final, o = lax.scan(step, state, parts)
    return o, final


def _default_chunks_per_step(num_chunks: int) -> int:
    """Accelerators: all chunks in one vectorised step (few large ops). CPU: the largest
    divisor of the chunk count that is <= 4 (a divisor, so no padding chunks are added).

    Measured on the 2-core CPU (B=1, T=2048, Hv=8, Dk=Dv=128, 32 chunks; wall time):
    1, 2 or 4 chunks per step 43 ms, 8: 46 ms, all 32 at once: 61 ms. Small groups keep the
    per-step working set in cache; batching every chunk streams ~10 intermediates of
    T x Hv x D floats through memory.
    """
    if jax.default_backend() != "cpu":
        return num_chunks
    return max(d for d in range(1, min(4, num_chunks) + 1) if num_chunks % d == 0)


def chunk_gated_delta_rule(
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
    chunks_per_step: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Chunked gated delta rule (prefill).

    The intra-chunk work (decay cumsum, masked exp, the UT solve, U, W, q.k) is vectorised
    over ``chunks_per_step`` chunks at a time and only the state carry is sequential. The
    groups themselves are stepped by ``lax.scan`` so the working set stays bounded.

    Args:
      q, k: [B, T, Hk, Dk]; v: [B, T, Hv, Dv] with Hv a multiple of Hk.
      g: [B, T, Hv] log decay (<= 0); beta: [B, T, Hv].
      initial_state: [B, Hv, Dk, Dv] float32, or None for zeros.
      lengths: optional [B] int32; only the first lengths[b] tokens of row b are real. The
        rest are turned into no-op steps (g = beta = 0), so the final state is the state
        after lengths[b] tokens; their outputs are zero.
      chunk_size: C; T is padded to a multiple of C with no-op steps.
      use_qk_l2norm: l2-normalise q and k (in float32) first.
      scale: query scale; default Dk ** -0.5.
      chunks_per_step: chunks whose intra-chunk work is batched per scan step (T is padded
        to whole steps); default: up to 4 on CPU, all chunks elsewhere
        (see :func:`_default_chunks_per_step`).

    Returns:
      (o [B, T, Hv, Dv] in v.dtype, final_state [B, Hv, Dk, Dv] float32).
    """
    _check_shapes(q, k, v, g, beta)
    batch, seq, hv, dv = v.shape
    dk = k.shape[-1]
    state = _initial_state(initial_state, batch, hv, dk, dv)
    num_chunks = max(1, -(-seq // chunk_size))
    group = min(chunks_per_step or _default_chunks_per_step(num_chunks), num_chunks)
    num_groups = -(-num_chunks // group)

    with jax.named_scope("gdn_prepare"):
        g, beta, valid = _mask_ragged(g.astype(jnp.float32), beta.astype(jnp.float32), lengths)
        # No head expansion here (ratio 1): key-side tensors stay per key head.
        qf, kf = _prepare_qk(q, k, 1, use_qk_l2norm, scale)
        vf = v.astype(jnp.float32)
        # Pad T up to whole groups of chunks with g = beta = 0: exact no-op steps.
        pad = num_groups * group * chunk_size - seq
        if pad:
            pad_t = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
            qf, kf, vf, g, beta = map(pad_t, (qf, kf, vf, g, beta))
        chunked = [_to_chunks(x, chunk_size) for x in (qf, kf, vf)]
        chunked += [_to_chunks(x[..., None], chunk_size)[..., 0] for x in (g, beta)]
        # [N, ...] -> [num_groups, group, ...]: the outer scan walks the groups.
        groups = [x.reshape(num_groups, group, *x.shape[1:]) for x in chunked]

    def group_step(s, xs):
        with jax.named_scope("gdn_intra_chunk"):
            parts = _intra_chunk(*xs)
        with jax.named_scope("gdn_state_pass"):
            o, s = _state_pass(parts, s)
        return s, o

    state, o = lax.scan(group_step, state.reshape(batch * hv, dk, dv), groups)
    o = _from_chunks(o.reshape(num_groups * group, *o.shape[2:]), batch)[:, :seq]
    if valid is not None:
        o = jnp.where(valid[..., None, None], o, 0.0)
    return o.astype(v.dtype), state.reshape(batch, hv, dk, dv)


# --------------------------------------------------------------------------- recurrent


def _step_normalised(s, q, k, v, g, beta):
    """One token on prepared inputs. s: [B, H, Dk, Dv]; q, k: [B, H, Dk]; v: [B, H, Dv];
    g, beta: [B, H]. Returns (new s, o [B, H, Dv])."""
    s = s * jnp.exp(g)[..., None, None]
    kv_mem = jnp.einsum("bhkv,bhk->bhv", s, k, precision=_PRECISION)
    delta = beta[..., None] * (v - kv_mem)
    s = s + k[..., :, None] * delta[..., None, :]
    o = jnp.einsum("bhkv,bhk->bhv", s, q, precision=_PRECISION)
    return s, o


def recurrent_gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    *,
    initial_state: jax.Array | None = None,
    lengths: jax.Array | None = None,
    use_qk_l2norm: bool = True,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Token-by-token gated delta rule (``lax.scan`` over T); same contract as
    :func:`chunk_gated_delta_rule` (without chunk_size)."""
    _, ratio = _check_shapes(q, k, v, g, beta)
    batch, _, hv, dv = v.shape
    state = _initial_state(initial_state, batch, hv, k.shape[-1], dv)
    g, beta, valid = _mask_ragged(g.astype(jnp.float32), beta.astype(jnp.float32), lengths)
    qf, kf = _prepare_qk(q, k, ratio, use_qk_l2norm, scale)
    xs = [jnp.moveaxis(x, 1, 0) for x in (qf, kf, v.astype(jnp.float32), g, beta)]

    def step(s, x):
        return _step_normalised(s, *x)

    state, o = lax.scan(step, state, xs)
    o = jnp.moveaxis(o, 0, 1)
    if valid is not None:
        o = jnp.where(valid[..., None, None], o, 0.0)
    return o.astype(v.dtype), state


def gated_delta_rule_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    state: jax.Array,
    *,
    use_qk_l2norm: bool = True,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One decode token.

    Args:
      q, k: [B, Hk, Dk]; v: [B, Hv, Dv]; g, beta: [B, Hv]; state: [B, Hv, Dk, Dv].
    Returns:
      (o [B, Hv, Dv] in v.dtype, new_state [B, Hv, Dk, Dv] float32).
    """
    hk, hv = k.shape[1], v.shape[1]
    if hv % hk:
        raise ValueError(f"value heads Hv={hv} must be a multiple of key heads Hk={hk}")
    qf, kf = _prepare_qk(q, k, hv // hk, use_qk_l2norm, scale)
    s, o = _step_normalised(
        state.astype(jnp.float32),
        qf,
        kf,
        v.astype(jnp.float32),
        g.astype(jnp.float32),
        beta.astype(jnp.float32),
    )
    return o.astype(v.dtype), s
