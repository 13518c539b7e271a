"""Sorted, capacity-free expert computation: each token-expert pair computed once.

A rank holds `G` experts and sees `N` tokens, each with `k` selected experts (global ids).
`grouped_experts` sorts the rank's (token, expert) pairs by expert and runs the SwiGLU
experts as grouped matmuls over the sorted rows: rows of group g multiply expert g's
weights only. No capacity: every pair is computed, however unbalanced the routing. The
static row count is `N * min(k, G)` (a token selects at most min(k, G) of this rank's
experts); pairs of other ranks' experts sort last and have group "none" (zero output).

Two grouped-matmul bodies, the same result:
- "ragged": `jax.lax.ragged_dot`. XLA's GPU and TPU backends lower it to a grouped GEMM
  whose work follows the group sizes. On CPU, jax lowers it to a dense masked dot over
  every group (G times the FLOPs: `scripts/bench_moe_flops.py` shows it).
- "tiled" (the CPU default): every group padded to a multiple of a tile of `m` rows, then
  one batched matmul over the tiles, each tile with its group's weights gathered:
  `[tiles, m, K] x [tiles, K, N]`. Static tiles: ceil(rows / m) + min(G, rows) (the padding
  of each non-empty group is < m rows), so the FLOPs are at most (rows + G*m) / rows of the
  minimum; `m` = the largest power of 2 <= rows / (4 G) keeps that under 1.25 + m/rows.
  Each tile reads its expert's weights once (about 5 G weight slices per matmul instead of
  G for the dense path: the price of not computing unselected pairs; on CPU that gather,
  not the FLOPs, bounds the speed when experts get few rows each).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GROUPED_BODIES = ("ragged", "tiled")


def default_body(platform: str) -> str:
    """ragged_dot where XLA lowers it to a grouped GEMM (GPU, TPU); tiled elsewhere (CPU)."""
    return "ragged" if platform in ("gpu", "cuda", "rocm", "tpu") else "tiled"


def tile_rows(rows: int, groups: int) -> int:
    """Rows per tile: the largest power of two <= rows / (4 * groups), at least 1."""
    target = max(1, rows // (4 * groups))
    return 1 << (target.bit_length() - 1)


def sort_by_expert(top_i: jax.Array, top_w: jax.Array, first_expert, groups: int):
    """top_i, top_w [N, k] (global expert ids, combine weights). -> (token [R], weight [R],
    group_sizes [G]) over R = N * min(k, G) rows sorted by local expert; rows past
    sum(group_sizes) belong to other ranks (their weight is 0)."""
    n, k = top_i.shape
    local = top_i.reshape(-1) - first_expert
    mine = (local >= 0) & (local < groups)
    key = jnp.where(mine, local, groups)  # other ranks' pairs sort last
    order = jnp.argsort(key, stable=True)[: n * min(k, groups)]
    sizes = jnp.zeros((groups + 1,), jnp.int32).at[key].add(1)[:groups]
    weight = jnp.where(mine, top_w.reshape(-1), jnp.zeros_like(top_w.reshape(-1)))[order]
    return (order // k).astype(jnp.int32), weight, sizes


def _tile_layout(sizes: jax.Array, rows: int, m: int):
    """Where each sorted row goes once every group is padded to a multiple of `m`:
    (padded position [rows] (out of range for rows past the groups), tile group [tiles])."""
    groups = sizes.shape[0]
    n_tiles = -(-rows // m) + min(groups, rows)  # each non-empty group adds < 1 tile of padding
    tiles = (sizes + m - 1) // m
    tile_end = jnp.cumsum(tiles)
    row_start = jnp.cumsum(sizes) - sizes
    padded_start = (tile_end - tiles) * m
    r = jnp.arange(rows, dtype=jnp.int32)
    g = jnp.searchsorted(jnp.cumsum(sizes), r, side="right")  # group of each row (G: none)
    valid = g < groups
    gc = jnp.minimum(g, groups - 1)
    pos = jnp.where(valid, padded_start[gc] + r - row_start[gc], n_tiles * m)
    tile_group = jnp.minimum(jnp.searchsorted(tile_end, jnp.arange(n_tiles), side="right"), groups - 1)
    return pos, tile_group, n_tiles


def grouped_experts(x: jax.Array, top_i: jax.Array, top_w: jax.Array, wg: jax.Array, wu: jax.Array,
                    wd: jax.Array, first_expert, *, body: str = "tiled") -> jax.Array:
    """x [N, H]; top_i, top_w [N, k]; wg, wu [G, H, I], wd [G, I, H] (this rank's experts, the
    first being global expert `first_expert`). -> [N, H] float32, this rank's share of
    sum_j w_j * down_e(silu(gate_e(x)) * up_e(x))."""
    if body not in GROUPED_BODIES:
        raise ValueError(f"grouped-matmul body must be one of {GROUPED_BODIES}, got {body!r}")
    n, hidden = x.shape
    groups = wg.shape[0]
    token, weight, sizes = sort_by_expert(top_i, top_w, first_expert, groups)
    rows = token.shape[0]
    xs = x[token]  # [R, H], sorted by expert
    if body == "ragged":
        g = jax.lax.ragged_dot(xs, wg, sizes)
        u = jax.lax.ragged_dot(xs, wu, sizes)
        h = jax.nn.silu(g) * u * weight[:, None].astype(g.dtype)
        y = jax.lax.ragged_dot(h, wd, sizes, preferred_element_type=jnp.float32)
    else:
        m = tile_rows(rows, groups)
        pos, tile_group, n_tiles = _tile_layout(sizes, rows, m)
        xp = jnp.zeros((n_tiles * m, hidden), x.dtype).at[pos].set(xs, mode="drop")
        xp = xp.reshape(n_tiles, m, hidden)
        g = jnp.einsum("tmh,thi->tmi", xp, wg[tile_group])
        u = jnp.einsum("tmh,thi->tmi", xp, wu[tile_group])
        wp = jnp.zeros((n_tiles * m,), weight.dtype).at[pos].set(weight, mode="drop")
        h = jax.nn.silu(g) * u * wp.reshape(n_tiles, m, 1).astype(g.dtype)
        yp = jnp.einsum("tmi,tih->tmh", h, wd[tile_group], preferred_element_type=jnp.float32)
        y = yp.reshape(n_tiles * m, hidden).at[pos].get(mode="fill", fill_value=0)
    return jnp.zeros((n, hidden), jnp.float32).at[token].add(y)


def sparse_flops(tokens: int, top_k: int, hidden: int, ffn: int) -> int:
    """The minimum FLOPs of the routed experts: 3 matmuls of [hidden] x [hidden, ffn] per
    (token, expert) pair, 2 FLOPs per multiply-add."""
    return 2 * 3 * tokens * top_k * hidden * ffn


__all__ = ["GROUPED_BODIES", "default_body", "grouped_experts", "sort_by_expert", "sparse_flops",
           "tile_rows"]
