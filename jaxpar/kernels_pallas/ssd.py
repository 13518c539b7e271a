"""Pure-JAX references of the Mamba2 state-space duality (SSD) scan.

Per head h (of H, in G groups of R = H / G heads; head h reads the B / C projections of
group h // R) the state ``S`` is ``[P, N]`` (head channels x state size, float32). With
``dt_t > 0`` the head's step size (already through softplus and the clamp) and ``A < 0``
its decay rate, one token does::

    S   <- exp(dt_t * A) * S + dt_t * x_t B_t^T
    y_t  = S C_t + D * x_t

Three forms live here, all with float32 maths and float32 outputs:

* :func:`ssd_chunked` -- the chunked (SSD) form: within a chunk of C tokens the output is
  a masked, decayed ``C B^T`` "attention" over ``dt * x``, batched over every chunk; only
  the state carried from chunk to chunk is sequential (``lax.scan``). The prefill path.
* :func:`ssd_recurrent` -- token by token (the definition, for tests).
* :func:`ssd_step` -- one decode token.

Ragged rows (``lengths``) and the padding to whole chunks set ``dt = 0`` past a row's
length: ``exp(0 * A) = 1`` and ``0 * x B^T = 0``, an exact no-op on the state.

Chunked form, for positions l, s inside a chunk, with ``a_t = dt_t * A`` and
``seg(l, s) = a_{s+1} + ... + a_l`` (for l >= s, summed directly rather than as a
difference of cumulative sums, which loses precision when the sums are large):

    y_l   = sum_{s <= l} exp(seg(l, s)) (C_l . B_s) dt_s x_s          (inside the chunk)
          + exp(seg(l, -1)) S_in C_l                                    (from the state)
    S_out = exp(seg(C-1, -1)) S_in + sum_s exp(seg(C-1, s)) dt_s x_s B_s^T
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["ssd_chunked", "ssd_recurrent", "ssd_step"]

_PRECISION = lax.Precision.HIGHEST


def _check(x, dt, a, b, c, d):
    batch, seq, h, _ = x.shape
    if dt.shape != (batch, seq, h):
        raise ValueError(f"dt must be [B, T, H]={(batch, seq, h)}, got {dt.shape}")
    if a.shape != (h,) or (d is not None and d.shape != (h,)):
        raise ValueError(f"A and D must be [H]={(h,)}, got {a.shape} and {None if d is None else d.shape}")
    if b.shape != c.shape or b.shape[:2] != (batch, seq):
        raise ValueError(f"B {b.shape} and C {c.shape} must be [B, T, G, N] matching x {x.shape}")
    g = b.shape[2]
    if h % g:
        raise ValueError(f"heads H={h} must be a multiple of groups G={g}")
    return g, h // g


def _initial(state, batch, h, p, n):
    if state is None:
        return jnp.zeros((batch, h, p, n), jnp.float32)
    if state.shape != (batch, h, p, n):
        raise ValueError(f"initial_state must be [B, H, P, N]={(batch, h, p, n)}, got {state.shape}")
    return state.astype(jnp.float32)


def _segment_sums(a: jax.Array) -> jax.Array:
    """a [..., L] -> seg [..., L, L] with seg[l, s] = a[s+1] + ... + a[l] for l >= s and
    -inf above the diagonal (so exp(seg) is the causal decay, exactly 0 where masked)."""
    length = a.shape[-1]
    later = jnp.arange(length)[:, None] > jnp.arange(length)[None, :]  # t > s
    terms = jnp.where(later, a[..., :, None], 0.0)  # [..., t, s] = a_t for t > s
    seg = jnp.cumsum(terms, axis=-2)
    causal = jnp.arange(length)[:, None] >= jnp.arange(length)[None, :]
    return jnp.where(causal, seg, -jnp.inf)


def ssd_chunked(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    *,
    D: jax.Array | None = None,
    initial_state: jax.Array | None = None,
    lengths: jax.Array | None = None,
    chunk_size: int = 128,
) -> tuple[jax.Array, jax.Array]:
    """Chunked SSD scan (prefill).

    Args:
      x: [Bt, T, H, P] head inputs; dt: [Bt, T, H] step sizes (> 0); A: [H] (< 0);
      B, C: [Bt, T, G, N]; D: [H] skip weights or None.
      initial_state: [Bt, H, P, N] or None (zeros); lengths: [Bt] valid tokens or None.
      chunk_size: tokens per chunk (T is padded to a multiple).
    Returns:
      (y [Bt, T, H, P] float32, final state [Bt, H, P, N] float32: the state after each
      row's last valid token).
    """
    g, r = _check(x, dt, A, B, C, D)
    bt, t, h, p = x.shape
    n = B.shape[-1]
    state = _initial(initial_state, bt, h, p, n)
    x32, dt32 = x.astype(jnp.float32), dt.astype(jnp.float32)
    if lengths is not None:
        dt32 = jnp.where((jnp.arange(t)[None, :] < lengths[:, None])[..., None], dt32, 0.0)
    cs = max(1, min(chunk_size, t))
    pad = -t % cs
    nc = (t + pad) // cs

    def chunks(u):  # [Bt, T, ...] -> [Bt, Nc, L, ...]
        u = jnp.pad(u, ((0, 0), (0, pad)) + ((0, 0),) * (u.ndim - 2))
        return u.reshape(bt, nc, cs, *u.shape[2:])

    xg = chunks(x32).reshape(bt, nc, cs, g, r, p)
    dtc = chunks(dt32).reshape(bt, nc, cs, g, r)
    bc, cc = chunks(B.astype(jnp.float32)), chunks(C.astype(jnp.float32))  # [Bt, Nc, L, G, N]
    a = jnp.moveaxis(dtc * A.astype(jnp.float32).reshape(g, r), 2, -1)  # [Bt, Nc, G, R, L]
    xdt = xg * dtc[..., None]  # [Bt, Nc, L, G, R, P]

    with jax.named_scope("ssd_intra_chunk"):
        decay = jnp.exp(_segment_sums(a))  # [Bt, Nc, G, R, L, L]
        scores = jnp.einsum("bclgn,bcsgn->bcgls", cc, bc, precision=_PRECISION)
        y = jnp.einsum("bcgrls,bcsgrp->bclgrp", decay * scores[:, :, :, None], xdt,
                       precision=_PRECISION)  # fmt: skip
    # Decays from each position to its chunk's end, and of the whole chunk.
    cum = jnp.cumsum(a, axis=-1)  # [Bt, Nc, G, R, L]: decay from the chunk start to l
    to_end = decay[..., -1, :]  # exp(seg(L-1, s)): the segment sums' last row, no cancellation
    chunk_states = jnp.einsum("bcgrl,bclgrp,bclgn->bcgrpn", to_end, xdt, bc,
                              precision=_PRECISION)  # fmt: skip
    chunk_decay = jnp.exp(cum[..., -1])  # [Bt, Nc, G, R]

    def carry(s, inputs):
        contrib, dec = inputs  # [Bt, G, R, P, N], [Bt, G, R]
        return dec[..., None, None] * s + contrib, s  # emit the state entering the chunk

    with jax.named_scope("ssd_state_scan"):
        s0 = state.reshape(bt, g, r, p, n)
        final, entering = lax.scan(carry, s0, (jnp.moveaxis(chunk_states, 1, 0),
                                               jnp.moveaxis(chunk_decay, 1, 0)))
    entering = jnp.moveaxis(entering, 0, 1)  # [Bt, Nc, G, R, P, N]
    from_state = jnp.einsum("bclgn,bcgrpn->bclgrp", cc, entering, precision=_PRECISION)
    y = y + from_state * jnp.moveaxis(jnp.exp(cum), -1, 2)[..., None]
    y = y.reshape(bt, nc * cs, h, p)[:, :t]
    if D is not None:
        y = y + D.astype(jnp.float32)[:, None] * x32
    return y, final.reshape(bt, h, p, n)


def ssd_step(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    state: jax.Array,
    *,
    D: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One decode token. x [Bt, H, P]; dt [Bt, H]; A [H]; B, C [Bt, G, N]; state
    [Bt, H, P, N]; D [H] or None. Returns (y [Bt, H, P] float32, new state float32)."""
    bt, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    r = h // g
    x32, dt32 = x.astype(jnp.float32), dt.astype(jnp.float32)
    s = state.astype(jnp.float32).reshape(bt, g, r, p, n)
    decay = jnp.exp(dt32 * A.astype(jnp.float32)).reshape(bt, g, r)
    xdt = (x32 * dt32[..., None]).reshape(bt, g, r, p)
    s = decay[..., None, None] * s + xdt[..., None] * B.astype(jnp.float32)[:, :, None, None, :]
    y = jnp.einsum("bgrpn,bgn->bgrp", s, C.astype(jnp.float32), precision=_PRECISION)
    y = y.reshape(bt, h, p)
    if D is not None:
        y = y + D.astype(jnp.float32)[:, None] * x32
    return y, s.reshape(bt, h, p, n)


def ssd_recurrent(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    *,
    D: jax.Array | None = None,
    initial_state: jax.Array | None = None,
    lengths: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Token-by-token :func:`ssd_step` over T (same contract as :func:`ssd_chunked`)."""
    _check(x, dt, A, B, C, D)
    bt, t, h, p = x.shape
    state = _initial(initial_state, bt, h, p, B.shape[-1])
    if lengths is not None:
        dt = jnp.where((jnp.arange(t)[None, :] < lengths[:, None])[..., None], dt, 0.0)

    def step(s, inputs):
        xt, dtt, bt_, ct = inputs
        y, s = ssd_step(xt, dtt, A, bt_, ct, s, D=D)
        return s, y

    final, ys = lax.scan(step, state, tuple(jnp.moveaxis(u, 1, 0) for u in (x, dt, B, C)))
    return jnp.moveaxis(ys, 0, 1), final
