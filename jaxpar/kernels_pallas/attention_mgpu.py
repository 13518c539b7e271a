"""Pallas Mosaic GPU (Hopper) attention kernels: causal flash prefill returning the
log-sum-exp, and split-KV decode with log-sum-exp that reads only each row's valid blocks.
Same contracts as :mod:`jaxpar.kernels_pallas.attention`, plus ``interpret`` (GPU
interpret mode on CPU, race detector on) and tiling knobs.

Prefill, one CTA per (query head, query block, batch row). Per warpgroup of 64 query rows:

* its Q tile [64, D] -> shared memory by one TMA copy;
* K and V tiles [block_kv, D] stream through a ``max_concurrent_steps``-deep ring of
  swizzled shared-memory slots filled by TMA, so the copies of blocks j+1.. overlap the
  math on block j. The pipeline grid is *dynamic*: only the key blocks below the query
  block's causal limit and the row's length are read;
* S = Q K^T by wgmma into a float32 accumulator; online softmax in float32 registers, in
  base 2 with the scale folded in (exp2 maps to one instruction); P V by wgmma;
* O and the LSE leave through shared memory by TMA stores. Query rows past the row's
  length are zero (LSE -inf). T need not be a multiple of the blocks: TMA zero-fills
  reads past the end and clips writes, so nothing is padded in HBM (beyond a multiple of
  8 rows, the TMA tile granularity).

Two CTA layouts share that per-warpgroup code (``warp_specialized``): the default, as in
FlashAttention-3, has two compute warpgroups (128 query rows per CTA, each K/V tile feeds
both) and a memory warpgroup issuing the TMA loads (``emit_pipeline_warp_specialized``);
the other has one warpgroup that issues its own loads ahead (``emit_pipeline``).

P's operand: wgmma can take its A operand from registers (``p_operand="registers"``, the
FlashAttention-3 way, no shared-memory round trip) or from shared memory
(``p_operand="smem"``: P is stored, fenced with ``commit_smem`` and read by wgmma). GPU
interpret mode only implements shared-memory operands, so interpreting uses "smem"; the
register form is checked by the CUDA lowering tests only, as is the in-place P V
accumulation of compiled kernels (see ``_pv``).

Decode, one CTA per (KV split, KV head, batch row): the query heads of one KV head form
the rows of a 64-row wgmma tile (zero rows above the group), K/V blocks stream through
the same pipeline, and only blocks up to the row's last valid slot are read. The DCP slot
layout (slot s holds position s * dcp + rank) is handled through ``slot_positions``.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxpar.kernels_pallas.attention import merge_attention_partials
from jaxpar.kernels_pallas.mgpu_common import (
    LN2,
    LOG2E,
    MASK,
    SMEM_LIMIT,
    UnsupportedShapeError,
    check_smem,
    interpret_params,
    require_16bit,
    require_multiple,
    tile_transforms,
)

__all__ = ["prefill_attention_mgpu", "decode_attention_mgpu"]

POperand = Literal["auto", "registers", "smem"]

# wgmma: one warpgroup multiplies 64 rows at a time.
_WG_ROWS = 64


def _resolve_p_operand(p_operand: POperand, interpret) -> str:
    if p_operand not in ("auto", "registers", "smem"):
        raise ValueError(f"p_operand must be 'auto', 'registers' or 'smem', got {p_operand!r}")
    if p_operand == "auto":
        return "smem" if interpret else "registers"
    if p_operand == "registers" and interpret:
        raise UnsupportedShapeError(
            "p_operand='registers' cannot be interpreted: GPU interpret mode implements wgmma "
            "only with both operands in shared memory (use p_operand='smem' or 'auto')"
        )
    return p_operand


def _check_head_dim(d: int, block_kv: int) -> None:
    require_multiple("head_dim", d, 64, "a 128-byte swizzled bf16 row is 64 items")
    if d > 256:
        raise UnsupportedShapeError(
            f"head_dim={d} is not supported by the Mosaic GPU kernel: at most 256 (wgmma N "
            f"and the float32 accumulator of a 64 x head_dim tile per warpgroup)"
        )
    require_multiple("block_kv", block_kv, 64, "wgmma K/N tiles and TMA boxes of 64 rows")
    if block_kv > 256:
        raise UnsupportedShapeError(f"block_kv={block_kv} must be <= 256 (wgmma N limit)")


def _online_softmax_step(s, carry, mask):
    """One key block of the online softmax in base 2.

    s: [rows, block_kv] float32 scores already multiplied by scale * log2(e); mask: bool,
    same shape (False = invisible). Returns (p [rows, block_kv] float32, alpha [rows],
    new m, new l); the caller rescales its accumulator by alpha and adds p V.
    """
    m, l = carry
    s = jnp.where(mask, s, MASK)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
    l = l * alpha + p.sum(axis=1)
    return p, alpha, m_new, l


def _pv(acc, p, v_smem, p_smem, dtype, in_place):
    """acc [rows, D] float32 + p [rows, block_kv] . V, with P from registers or shared memory.

    ``in_place`` (compiled): wgmma accumulates into ``acc`` itself
    (``pl.run_state(plgpu.ACC.init(acc))``), so only one [rows, D] float32 tile is live,
    which matters at head_dim 256 (128 registers per thread). GPU interpret mode does not
    implement ``run_state``, so interpreting sends the product to a fresh accumulator that
    is then added: the same sum, one more register tile.
    """
    p16 = p.astype(dtype)
    if p_smem is not None:
        p_smem[...] = p16
        plgpu.commit_smem()  # order the register stores before the async-proxy wgmma read
    a = p_smem if p_smem is not None else p16

    if in_place:

        def accumulate(acc_ref):
            plgpu.wgmma(acc_ref, a, v_smem)

        return pl.run_state(accumulate)(plgpu.ACC.init(acc))

    def mma(acc_ref):
        plgpu.wgmma(acc_ref, a, v_smem)
        return acc_ref[...]

    return acc + pl.run_scoped(mma, plgpu.ACC(acc.shape, jnp.float32))


def _finish(acc, m, l, row_valid):
    """Normalised output and natural-log LSE; rows that are not valid get 0 and -inf."""
    seen = row_valid & (m > 0.5 * MASK)
    l_safe = jnp.where(seen, l, 1.0)
    o = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
    o = jnp.where(lax.broadcast_in_dim(seen, acc.shape, [0]), o, 0.0)
    lse = jnp.where(seen, (m + jnp.log2(l_safe)) * LN2, -jnp.inf)
    return o, lse


# ------------------------------------------------------------------------------ prefill


class _QueryTile:
    """One warpgroup's 64 query rows of the prefill: Q in, the K/V step, O and LSE out."""

    def __init__(
        self, *, q_smem, p_smem, lse_smem, q0, length, causal, block_kv, scale, in_place
    ):
        self.q_smem, self.p_smem, self.lse_smem = q_smem, p_smem, lse_smem
        self.in_place = in_place
        self.q0, self.length, self.causal = q0, length, causal
        self.block_kv, self.qk_scale = block_kv, scale * LOG2E
        shape = (_WG_ROWS, block_kv)
        self.q_pos = q0 + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
        self.k_iota = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)

    def init_carry(self, d):
        rows = plgpu.Layout.WGMMA.reduce(1)
        return (
            plgpu.layout_cast(jnp.zeros((_WG_ROWS, d), jnp.float32), plgpu.Layout.WGMMA),
            plgpu.layout_cast(jnp.full((_WG_ROWS,), MASK, jnp.float32), rows),
            plgpu.layout_cast(jnp.zeros((_WG_ROWS,), jnp.float32), rows),
        )

    def step(self, j, k_smem, v_smem, carry):
        """Key block j: S = Q K^T (wgmma), mask, online softmax, acc += P V (wgmma)."""
        acc, m, l = carry

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, self.q_smem, k_smem.transpose((1, 0)))
            return acc_ref[...]

        s = pl.run_scoped(qk, plgpu.ACC((_WG_ROWS, self.block_kv), jnp.float32))
        k_pos = j * self.block_kv + self.k_iota
        visible = k_pos < self.length
        if self.causal:
            visible = visible & (k_pos <= self.q_pos)
        p, alpha, m, l = _online_softmax_step(s * self.qk_scale, (m, l), visible)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        return _pv(acc, p, v_smem, self.p_smem, self.q_smem.dtype, self.in_place), m, l

    def store(self, carry, o_gmem, lse_gmem):
        """Writes O (through Q's tile, no longer needed) and the LSE by TMA."""
        acc, m, l = carry
        rows = self.q0 + plgpu.broadcasted_iota(
            jnp.int32, (_WG_ROWS,), 0, layout=plgpu.Layout.WGMMA.reduce(1)
        )
        o, lse = _finish(acc, m, l, rows < self.length)
        self.q_smem[...] = o.astype(self.q_smem.dtype)
        self.lse_smem[...] = lse
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(self.q_smem, o_gmem)
        plgpu.copy_smem_to_gmem(self.lse_smem, lse_gmem)
        plgpu.wait_smem_to_gmem(0)


def prefill_attention_mgpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    causal: bool = True,
    window: int | None = None,
    block_kv: int = 64,
    max_concurrent_steps: int = 2,
    warp_specialized: bool = True,
    p_operand: POperand = "auto",
    return_lse: bool = False,
    interpret=False,
):
    """Flash-attention prefill on Hopper. Same contract as ``attention.prefill_attention``.

    q: [B, T, H, D]; k, v: [B, T, KVH, D] (bf16 or f16; D <= 256, zero-padded to a
    multiple of 64); lengths: [B] int32.
    Returns o [B, T, H, D] in q.dtype, and with ``return_lse=True`` also the log-sum-exp
    [B, T, H] float32 of the scaled scores (-inf on padding rows), which DCP merges and
    chunked prefill combine. block_kv key rows per pipeline step, ``max_concurrent_steps``
    (>= 2) K/V tiles in flight.

    ``warp_specialized=True`` (FlashAttention-3 layout): a CTA per 128 query rows, two
    compute warpgroups of 64 rows each and a memory warpgroup that issues the TMA loads
    (``emit_pipeline_warp_specialized``), so one K/V tile feeds two query tiles.
    ``warp_specialized=False``: a CTA per 64 query rows, one warpgroup that issues its own
    TMA loads ahead of the math (``emit_pipeline``).
    """
    b, t, h, d = q.shape
    kvh = k.shape[2]
    if window is not None:
        raise UnsupportedShapeError("the Mosaic GPU prefill kernel has no sliding-window mask "
                                    f"(window={window})")
    if k.shape != (b, t, kvh, d) or v.shape != k.shape:
        raise ValueError(f"k {k.shape} and v {v.shape} must be [B, T, KVH, D] matching q {q.shape}")
    if h % kvh:
        raise UnsupportedShapeError(f"query heads H={h} must be a multiple of KV heads {kvh}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        require_16bit(name, x.dtype)
    if not (q.dtype == k.dtype == v.dtype):
        raise UnsupportedShapeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    # head_dim not a multiple of 64 (e.g. 96) is zero-padded: q.k and the kept output
    # columns are unchanged. Prefill reads q, k, v once, so the copy is cheap.
    d_orig, d = d, -(-d // 64) * 64
    _check_head_dim(d, block_kv)
    if d != d_orig:
        q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, d - d_orig))) for x in (q, k, v))
    if max_concurrent_steps < 2:
        raise ValueError(f"max_concurrent_steps={max_concurrent_steps} must be >= 2")
    params = interpret_params(interpret)
    p_mode = _resolve_p_operand(p_operand, params is not None)
    group = h // kvh
    dtype = q.dtype
    wgs = 2 if warp_specialized else 1  # compute warpgroups, 64 query rows each
    block_q = wgs * _WG_ROWS
    check_smem(
        "prefill attention",
        wgs * _WG_ROWS * (d * 2 + (block_kv * 2 if p_mode == "smem" else 0) + 4)
        + 2 * max_concurrent_steps * block_kv * d * 2,
        "lower block_kv or max_concurrent_steps",
    )  # fmt: skip
    # TMA addresses the swizzled tiles in 8-row groups, so the global row count must be a
    # multiple of 8; other lengths are padded (rare: prefill buckets are powers of two).
    # The last query / key block may still run past T: TMA zero-fills those reads and
    # drops those writes.
    t_orig, pad = t, -t % 8
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        t = t + pad
    transforms = tile_transforms(d, dtype)
    num_q_blocks = pl.cdiv(t, block_q)
    kv_spec = plgpu.BlockSpec((block_kv, d), lambda j: (j, 0), transforms=transforms)

    def kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, q_smem, lse_smem, p_smem, q_bar):
        head = lax.axis_index("heads")
        qi = lax.axis_index("q_blocks")
        row = lax.axis_index("batch")
        wg = lax.axis_index("wg") if warp_specialized else 0
        length = len_ref[row]
        cta_q0 = qi * block_q
        # Key blocks this CTA's query rows can see: below the causal limit of its last
        # row and the row length (a warpgroup past its own limit sees them fully masked).
        kv_end = jnp.minimum(length, cta_q0 + block_q) if causal else length
        num_kv = jnp.where(cta_q0 < length, pl.cdiv(kv_end, block_kv), 0)
        q0 = cta_q0 + wg * _WG_ROWS
        rows = pl.ds(q0, _WG_ROWS)
        kv = (k_ref.at[row, :, lax.div(head, jnp.int32(group))],
              v_ref.at[row, :, lax.div(head, jnp.int32(group))])  # fmt: skip

        def query_tile():
            """Loads this warpgroup's Q tile; returns its _QueryTile."""
            tile = _QueryTile(
                q_smem=q_smem.at[wg], p_smem=None if p_smem is None else p_smem.at[wg],
                lse_smem=lse_smem.at[wg], q0=q0, length=length, causal=causal,
                block_kv=block_kv, scale=scale, in_place=params is None,
            )  # fmt: skip
            plgpu.copy_gmem_to_smem(q_ref.at[row, rows, head], tile.q_smem, q_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])
            return tile

        outputs = (o_ref.at[row, rows, head], lse_ref.at[row, head, rows])
        if not warp_specialized:
            tile = query_tile()
            carry = plgpu.emit_pipeline(
                lambda idx, k_smem, v_smem, c: tile.step(idx[0], k_smem, v_smem, c),
                grid=(num_kv,),
                in_specs=[kv_spec, kv_spec],
                max_concurrent_steps=max_concurrent_steps,
                init_carry=tile.init_carry(d),
            )(*kv)
            tile.store(carry, *outputs)
            return

        # The compute warpgroups load their Q tile in compute_context; the pipeline body,
        # traced inside run_pipeline, reads the tile from this list.
        tiles = []

        def compute_context(run_pipeline):
            tiles.append(query_tile())
            tiles[0].store(run_pipeline(tiles[0].init_carry(d)), *outputs)

        plgpu.emit_pipeline_warp_specialized(
            lambda idx, k_smem, v_smem, c: tiles[0].step(idx[0], k_smem, v_smem, c),
            grid=(num_kv,),
            in_specs=[kv_spec, kv_spec],
            max_concurrent_steps=max_concurrent_steps,
            memory_registers=40,
            wg_axis="wg",
            num_compute_wgs=wgs,
            compute_context=compute_context,
        )(*kv)

    scratch = [
        plgpu.SMEM((wgs, _WG_ROWS, d), dtype, transforms=transforms),
        plgpu.SMEM((wgs, _WG_ROWS), jnp.float32),
        plgpu.SMEM((wgs, _WG_ROWS, block_kv), dtype, transforms=tile_transforms(block_kv, dtype))
        if p_mode == "smem"
        else None,
        plgpu.Barrier(num_barriers=wgs),
    ]
    threads = dict(num_threads=wgs + 1, thread_name="wg") if warp_specialized else {}
    o, lse = plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct((b, t, h, d), dtype),
            # T minor so each query tile's LSE is one contiguous 1-D TMA store, padded to
            # whole query blocks (a 1-D TMA needs 16-byte aligned row strides).
            jax.ShapeDtypeStruct((b, h, num_q_blocks * block_q), jnp.float32),
        ),
        scratch_types=scratch,
        grid=(h, num_q_blocks, b),
        grid_names=("heads", "q_blocks", "batch"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=params,
        kernel_name="jaxpar_prefill_attention_mgpu",
        **threads,
    )(lengths.astype(jnp.int32), q, k, v)
    o = o[:, :t_orig, :, :d_orig]
    if return_lse:
        return o, jnp.swapaxes(lse[:, :, :t_orig], 1, 2)
    return o


def _default_num_splits(batch: int, kv_heads: int, slots: int, block_kv: int) -> int:
    """Enough CTAs to fill the GPU (about two per SM) without splits shorter than 8 blocks:
    decode reads the cache once, so parallelism must come from splitting it."""
    cores = getattr(jax.devices()[0], "core_count", None) or 132
    want = pl.cdiv(2 * cores, batch * kv_heads)
    return int(max(1, min(want, slots // (8 * block_kv))))


def _valid_end(kv_lens: jax.Array, slot_positions: jax.Array | None, slots: int) -> jax.Array:
    """[B] one past the last valid slot of each row: blocks from there on are never read.

    Without positions slot s holds position s, so it is min(kv_len, S). With positions
    (any order; for the DCP layout s * dcp + rank it is the count of valid slots) it is the
    last slot whose position is < kv_len, plus one.
    """
    kv_lens = kv_lens.astype(jnp.int32)
    if slot_positions is None:
        return jnp.clip(kv_lens, 0, slots)
    valid = slot_positions.astype(jnp.int32)[None, :] < kv_lens[:, None]  # [B, S]
    last = jnp.max(jnp.where(valid, jnp.arange(slots, dtype=jnp.int32)[None, :], -1), axis=1)
    return last + 1


def decode_attention_mgpu(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    kv_lens: jax.Array,
    *,
    scale: float,
    kv_starts: jax.Array | None = None,
    slot_positions: jax.Array | None = None,
    block_kv: int = 64,
    num_splits: int | None = None,
    max_concurrent_steps: int | None = None,
    p_operand: POperand = "auto",
    interpret=False,
) -> tuple[jax.Array, jax.Array]:
    """Split-KV decode attention on Hopper. Same contract as ``attention.decode_attention``.

    q: [B, H, D]; k_cache, v_cache: [B, S, KVH, D] (bf16 or f16); kv_lens: [B] int32;
    slot_positions: optional [S] int32 position held by each slot (DCP: s * dcp + rank).
    Returns (o [B, H, D] float32, lse [B, H] float32).

    Grid: (split, KV head, batch row). Split i covers slots [i * L, (i + 1) * L) with
    L = ceil(S / num_splits) rounded up to block_kv, and pipelines only the blocks below
    the row's last valid slot, so an empty split reads nothing. Splits are merged by
    log-sum-exp. The query heads of a KV head (G = H / KVH <= 64) are the rows of one
    64-row wgmma tile. S must be a multiple of 8 (TMA tiles; the cache is not padded per
    step, that would copy it). ``max_concurrent_steps``: K/V tiles in flight, by default
    as many as fit in shared memory, up to 4 (decode is bound by HBM bandwidth).
    """
    b, h, d = q.shape
    _, s_len, kvh, _ = k_cache.shape
    if kv_starts is not None:
        raise UnsupportedShapeError("the Mosaic GPU decode kernel reads a prefix of slots and "
                                    "cannot start a row at kv_starts (sliding window)")
    if k_cache.shape != (b, s_len, kvh, d) or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"k_cache {k_cache.shape} and v_cache {v_cache.shape} must be [B, S, KVH, D] "
            f"matching q {q.shape}"
        )
    if h % kvh:
        raise UnsupportedShapeError(f"query heads H={h} must be a multiple of KV heads {kvh}")
    group = h // kvh
    if group > _WG_ROWS:
        raise UnsupportedShapeError(
            f"query heads per KV head G={group} must be <= {_WG_ROWS} (one wgmma row tile)"
        )
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        require_16bit(name, x.dtype)
    if k_cache.dtype != v_cache.dtype:
        raise UnsupportedShapeError(f"k_cache {k_cache.dtype} and v_cache {v_cache.dtype} differ")
    _check_head_dim(d, block_kv)
    require_multiple("KV cache length S", s_len, 8, "TMA addresses swizzled tiles by 8 rows")
    if max_concurrent_steps is not None and max_concurrent_steps < 2:
        raise ValueError(f"max_concurrent_steps={max_concurrent_steps} must be >= 2")
    if slot_positions is not None and slot_positions.shape != (s_len,):
        raise ValueError(f"slot_positions must be [S]={(s_len,)}, got {slot_positions.shape}")
    params = interpret_params(interpret)
    p_mode = _resolve_p_operand(p_operand, params is not None)
    dtype = k_cache.dtype
    if num_splits is None:
        num_splits = _default_num_splits(b, kvh, s_len, block_kv)
    blocks_per_split = pl.cdiv(pl.cdiv(s_len, block_kv), num_splits)
    split_len = blocks_per_split * block_kv
    num_splits = pl.cdiv(s_len, split_len)  # no split starts past the cache
    qk_scale = scale * LOG2E
    transforms = tile_transforms(d, dtype)
    has_positions = slot_positions is not None
    q_tile = _WG_ROWS * d * 2
    p_tile = _WG_ROWS * block_kv * 2 if p_mode == "smem" else 0
    stage = 2 * block_kv * d * 2 + (block_kv * 4 if has_positions else 0)  # K, V (, positions)
    if max_concurrent_steps is None:
        # Decode only streams the cache: as many tiles in flight as fit, up to 4.
        max_concurrent_steps = int(max(2, min(4, (SMEM_LIMIT - q_tile - p_tile) // stage)))
    pipeline = max_concurrent_steps * stage
    check_smem(
        "decode attention",
        max(q_tile + pipeline + p_tile, q_tile + p_tile + _WG_ROWS * (d + 1) * 4),
        "lower block_kv or max_concurrent_steps",
    )

    def kernel(end_ref, len_ref, q_ref, k_ref, v_ref, *rest):
        if has_positions:
            pos_ref, o_ref, lse_ref, q_smem, p_smem, q_bar = rest
        else:
            pos_ref, (o_ref, lse_ref, q_smem, p_smem, q_bar) = None, rest
        split = lax.axis_index("splits")
        kv_head = lax.axis_index("kv_heads")
        row = lax.axis_index("batch")
        valid_end = end_ref[row]
        kv_len = len_ref[row]
        start = split * split_len
        num_kv = jnp.clip(pl.cdiv(valid_end - start, block_kv), 0, blocks_per_split)

        plgpu.copy_gmem_to_smem(q_ref.at[row, kv_head], q_smem, q_bar)
        plgpu.barrier_wait(q_bar)
        slot_iota = plgpu.broadcasted_iota(
            jnp.int32, (_WG_ROWS, block_kv), 1, layout=plgpu.Layout.WGMMA
        )

        def step(idx, k_smem, v_smem, *pos_and_carry):
            pos_smem, (acc, m, l) = (
                pos_and_carry if has_positions else (None, pos_and_carry[0])
            )
            (j,) = idx

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, k_smem.transpose((1, 0)))
                return acc_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((_WG_ROWS, block_kv), jnp.float32)) * qk_scale
            slot = start + j * block_kv + slot_iota
            visible = slot < valid_end
            if has_positions:
                pos = plgpu.load(pos_smem, layout=plgpu.Layout.WGMMA.reduce(0))
                pos = lax.broadcast_in_dim(pos, s.shape, [1])
                visible = visible & (pos < kv_len)
            p, alpha, m, l = _online_softmax_step(s, (m, l), visible)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            acc = _pv(acc, p, v_smem, p_smem, dtype, in_place=params is None)
            return acc, m, l

        init = (
            plgpu.layout_cast(jnp.zeros((_WG_ROWS, d), jnp.float32), plgpu.Layout.WGMMA),
            plgpu.layout_cast(
                jnp.full((_WG_ROWS,), MASK, jnp.float32), plgpu.Layout.WGMMA.reduce(1)
            ),
            plgpu.layout_cast(
                jnp.zeros((_WG_ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)
            ),
        )
        kv_spec = plgpu.BlockSpec((block_kv, d), lambda j: (j, 0), transforms=transforms)
        in_specs = [kv_spec, kv_spec]
        operands = [
            k_ref.at[row, pl.ds(start, split_len), kv_head],
            v_ref.at[row, pl.ds(start, split_len), kv_head],
        ]
        if has_positions:
            in_specs.append(plgpu.BlockSpec((block_kv,), lambda j: (j,)))
            operands.append(pos_ref.at[pl.ds(start, split_len)])
        acc, m, l = plgpu.emit_pipeline(
            step,
            grid=(num_kv,),
            in_specs=in_specs,
            max_concurrent_steps=max_concurrent_steps,
            init_carry=init,
        )(*operands)

        all_rows = plgpu.layout_cast(
            jnp.full((_WG_ROWS,), True), plgpu.Layout.WGMMA.reduce(1)
        )
        o, lse = _finish(acc, m, l, all_rows)

        # Allocated after the pipeline, so the float32 output tile reuses its K/V slots.
        def store(o_smem, lse_smem):
            o_smem[...] = o
            lse_smem[...] = lse
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, group)], o_ref.at[split, row, kv_head])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[split, row, kv_head])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(store, plgpu.SMEM((_WG_ROWS, d), jnp.float32),
                      plgpu.SMEM((_WG_ROWS,), jnp.float32))  # fmt: skip

    # The query heads of each KV head, zero-padded to the 64 rows of a wgmma tile.
    qg = q.astype(dtype).reshape(b, kvh, group, d)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, _WG_ROWS - group), (0, 0)))
    args = [_valid_end(kv_lens, slot_positions, s_len), kv_lens.astype(jnp.int32), qg,
            k_cache, v_cache]  # fmt: skip
    if has_positions:
        args.append(slot_positions.astype(jnp.int32))
    scratch = [
        plgpu.SMEM((_WG_ROWS, d), dtype, transforms=transforms),
        plgpu.SMEM((_WG_ROWS, block_kv), dtype, transforms=tile_transforms(block_kv, dtype))
        if p_mode == "smem"
        else None,
        plgpu.Barrier(),
    ]
    o, lse = plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct((num_splits, b, kvh, group, d), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, b, kvh, _WG_ROWS), jnp.float32),
        ),
        scratch_types=scratch,
        grid=(num_splits, kvh, b),
        grid_names=("splits", "kv_heads", "batch"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=params,
        kernel_name="jaxpar_decode_attention_mgpu",
    )(*args)
    lse = lse[..., :group]
    if num_splits > 1:
        o, lse = merge_attention_partials(o, lse)
    else:
        o, lse = o[0], lse[0]
    return o.reshape(b, h, d), lse.reshape(b, h)
