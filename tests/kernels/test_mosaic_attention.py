"""Mosaic GPU (Hopper) attention kernels against the pure-JAX references, in GPU interpret
mode on CPU with the race detector on (a race raises), and lowered for CUDA without a GPU.

What interpret mode exercises: the kernels' real tiling and memory movement (TMA copies
into swizzled shared memory with zero-filled out-of-bounds reads and clipped writes, the
pipeline slot rings and their barriers, shared-memory stores fenced for the tensor cores),
wgmma with float32 accumulators, the online softmax and the masks, and the happens-before
ordering of every access -- for the warp-specialised prefill also the hand-off between the
memory warpgroup and the two compute warpgroups. What only a GPU proves (not interpreted
here): wgmma with P in registers (``p_operand="registers"``, the GPU default) and P.V
accumulated in place (``pl.run_state``), both lowered for CUDA below; asynchronous wgmma
completion (the interpreter runs it synchronously),
``approx_math`` exp2/log2, register allocation and spills (ptxas), the shared-memory limit
(checked by the wrappers' own count), and speed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpar.kernels_pallas import attention as ref
from tests.mosaic_interpret import (
    lower_for_cuda,
    mosaic_kernel_count,
    requires_interpret,
    reset_interpreter,
)

pytestmark = requires_interpret

BF16 = jnp.bfloat16
TOL = 2e-2  # bf16 inputs, P rounded to bf16 before the P.V wgmma (as on the GPU)

# Jitted references: one compile each instead of op-by-op dispatch.
prefill_ref = jax.jit(ref.prefill_attention, static_argnames=("scale", "causal"))
decode_ref = jax.jit(ref.decode_attention, static_argnames=("scale",))


def _am():
    from jaxpar.kernels_pallas import attention_mgpu

    return attention_mgpu


def randn(rng, *shape, dtype=BF16):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


def prefill_lse(q, k, lengths, scale, causal):
    """[B, T, H] float64 log-sum-exp of the visible scaled scores (-inf on padding rows)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, t, h, _ = q.shape
    k = np.repeat(k, h // k.shape[2], axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    pos = np.arange(t)
    vis = (pos[None, None, :] < np.asarray(lengths)[:, None, None]) & np.ones((1, t, 1), bool)
    if causal:
        vis = vis & (pos[None, :, None] >= pos[None, None, :])
    vis = vis & (pos[None, :, None] < np.asarray(lengths)[:, None, None])
    s = np.where(vis[:, None], s, -np.inf)
    m = s.max(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        lse = np.log(np.exp(s - np.where(np.isfinite(m), m, 0)).sum(-1)) + np.where(
            np.isfinite(m[..., 0]), m[..., 0], 0
        )
    return np.transpose(lse, (0, 2, 1))


# (B, T, H, KVH, D, lengths, causal, max_concurrent_steps, warp_specialized): GQA groups
# 1 / 4 / 8, head_dim 256, 128 and 96 (zero-padded to 128), T not a multiple of the query
# or key blocks, ragged rows (with a CTA wholly past its row's length), 3 key blocks
# through 2 pipeline slots, both the single-warpgroup pipeline and the warp-specialised
# (2 compute + 1 memory warpgroups) kernel.
PREFILL_CASES = [
    (1, 100, 2, 2, 256, [91], True, 2, False),
    (2, 200, 4, 1, 128, [200, 70], True, 2, True),
    (1, 130, 8, 1, 128, [130], True, 2, False),
    (1, 100, 2, 1, 96, [77], False, 3, True),
]


@pytest.mark.parametrize("b,t,h,kvh,d,lengths,causal,steps,ws", PREFILL_CASES)
def test_prefill_matches_reference(b, t, h, kvh, d, lengths, causal, steps, ws):
    rng = np.random.default_rng(t + h)
    q, k, v = randn(rng, b, t, h, d), randn(rng, b, t, kvh, d), randn(rng, b, t, kvh, d)
    lengths = jnp.asarray(lengths, jnp.int32)
    scale = d**-0.5
    run = jax.jit(lambda *a: _am().prefill_attention_mgpu(
        *a, scale=scale, causal=causal, max_concurrent_steps=steps, warp_specialized=ws,
        return_lse=True, interpret=True,
    ))  # fmt: skip
    o, lse = run(q, k, v, lengths)
    o_ref = prefill_ref(q, k, v, lengths, scale=scale, causal=causal)
    assert o.dtype == BF16 and o.shape == q.shape and lse.shape == (b, t, h)
    np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(o_ref, np.float32),
                               atol=TOL, rtol=TOL)  # fmt: skip
    lse_ref = prefill_lse(q, k, lengths, scale, causal)
    lse = np.asarray(lse)
    assert np.array_equal(np.isneginf(lse), np.isneginf(lse_ref))  # exactly the padding rows
    finite = np.isfinite(lse_ref)
    np.testing.assert_allclose(lse[finite], lse_ref[finite], atol=1e-3, rtol=1e-4)
    for row, n in enumerate(np.asarray(lengths)):
        assert not np.any(np.asarray(o[row, n:], np.float32))  # padding query rows are zero


# (B, S, H, KVH, D, num_splits, dcp, kv_lens): dcp = (rank, size) -> slot s holds position
# s * size + rank; S not a multiple of 64; empty rows and splits.
DECODE_CASES = [
    (2, 200, 2, 2, 256, 2, None, [200, 63]),
    (3, 136, 4, 1, 128, 1, (1, 2), [273, 100, 0]),
    (2, 256, 8, 1, 128, 2, (0, 4), [1024, 130]),
]


@pytest.mark.parametrize("b,s,h,kvh,d,splits,dcp,kv_lens", DECODE_CASES)
def test_decode_matches_reference(b, s, h, kvh, d, splits, dcp, kv_lens):
    rng = np.random.default_rng(s + h)
    q, kc, vc = randn(rng, b, h, d), randn(rng, b, s, kvh, d), randn(rng, b, s, kvh, d)
    kv_lens = jnp.asarray(kv_lens, jnp.int32)
    positions = None if dcp is None else jnp.arange(s, dtype=jnp.int32) * dcp[1] + dcp[0]
    kw = dict(scale=d**-0.5, slot_positions=positions)
    run = jax.jit(lambda *a: _am().decode_attention_mgpu(
        *a, num_splits=splits, interpret=True, **kw
    ))  # fmt: skip
    o, lse = run(q, kc, vc, kv_lens)
    # The model passes DCP ranks their local prefix of valid slots; the kernel's positions
    # path must give the same answer.
    local = kv_lens if dcp is None else ref.dcp_local_lengths(kv_lens, dcp[0], dcp[1])
    o_ref, lse_ref = decode_ref(q, kc, vc, local, scale=kw["scale"])
    assert o.dtype == jnp.float32 and lse.dtype == jnp.float32
    np.testing.assert_allclose(o, o_ref, atol=TOL, rtol=TOL)
    lse, lse_ref = np.asarray(lse), np.asarray(lse_ref)
    assert np.array_equal(np.isneginf(lse), np.isneginf(lse_ref))
    finite = np.isfinite(lse_ref)
    np.testing.assert_allclose(lse[finite], lse_ref[finite], atol=1e-3, rtol=1e-4)


def test_decode_reads_only_valid_blocks():
    """Blocks past each row's last valid slot hold NaN: had the kernel read them, the
    output would be NaN. Invalid slots inside the last valid block hold huge values the
    mask must hide."""
    rng = np.random.default_rng(9)
    b, s, h, kvh, d = 2, 256, 4, 2, 128
    q, kc, vc = randn(rng, b, h, d), randn(rng, b, s, kvh, d), randn(rng, b, s, kvh, d)
    kv_lens = jnp.array([100, 30], jnp.int32)
    o_ref, lse_ref = decode_ref(q, kc, vc, kv_lens, scale=0.1)
    slot = jnp.arange(s)[None, :, None, None]
    valid_blocks = (-(-kv_lens // 64) * 64)[:, None, None, None]
    poison = lambda c: jnp.where(slot >= valid_blocks, jnp.nan,  # noqa: E731
                                 jnp.where(slot >= kv_lens[:, None, None, None], 3e4, c))
    o, lse = jax.jit(lambda *a: _am().decode_attention_mgpu(
        *a, scale=0.1, num_splits=2, interpret=True
    ))(q, poison(kc), poison(vc), kv_lens)  # fmt: skip
    assert np.all(np.isfinite(np.asarray(o)))
    np.testing.assert_allclose(o, o_ref, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(lse, lse_ref, atol=1e-3, rtol=1e-4)


def test_rejections_raise_unsupported_shape():
    am = _am()
    rng = np.random.default_rng(0)
    lens = jnp.array([8], jnp.int32)
    x = randn(rng, 1, 8, 2, 128)
    with pytest.raises(am.UnsupportedShapeError, match="bfloat16 or float16"):
        am.prefill_attention_mgpu(x.astype(jnp.float32), x.astype(jnp.float32),
                                  x.astype(jnp.float32), lens, scale=0.1)  # fmt: skip
    y = randn(rng, 1, 8, 2, 320)
    with pytest.raises(am.UnsupportedShapeError, match="head_dim=320"):
        am.prefill_attention_mgpu(y, y, y, lens, scale=0.1)
    c96 = randn(rng, 1, 64, 2, 96)  # decode does not pad: that would copy the cache
    with pytest.raises(am.UnsupportedShapeError, match="head_dim=96"):
        am.decode_attention_mgpu(randn(rng, 1, 2, 96), c96, c96, lens, scale=0.1)
    with pytest.raises(am.UnsupportedShapeError, match="p_operand='registers'"):
        am.prefill_attention_mgpu(x, x, x, lens, scale=0.1, p_operand="registers",
                                  interpret=True)  # fmt: skip
    big = randn(rng, 1, 8, 2, 256)
    with pytest.raises(am.UnsupportedShapeError, match="shared memory"):
        am.prefill_attention_mgpu(big, big, big, lens, scale=0.1, block_kv=128)
    with pytest.raises(am.UnsupportedShapeError, match="S=60"):
        c = randn(rng, 1, 60, 2, 128)
        am.decode_attention_mgpu(randn(rng, 1, 2, 128), c, c, lens, scale=0.1)
    with pytest.raises(am.UnsupportedShapeError, match="G=128"):
        c = randn(rng, 1, 64, 1, 128)
        am.decode_attention_mgpu(randn(rng, 1, 128, 128), c, c, lens, scale=0.1)


def test_race_detector_is_live():
    """Guards the premise of these tests: two grid blocks writing the same output tile
    without ordering must be reported (and disjoint writes must not)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def kernel(x_ref, o_ref, smem, bar, *, overlap):
        i = jax.lax.axis_index("blocks")
        plgpu.copy_gmem_to_smem(x_ref, smem, bar)
        plgpu.barrier_wait(bar)
        smem[...] = smem[...] * 2.0
        plgpu.commit_smem()
        rows = pl.ds(0 if overlap else i * 8, 8)
        plgpu.copy_smem_to_gmem(smem, o_ref.at[rows])
        plgpu.wait_smem_to_gmem(0)

    def run(overlap):
        return plgpu.kernel(
            lambda *r: kernel(*r, overlap=overlap),
            out_type=jax.ShapeDtypeStruct((16, 128), jnp.float32),
            scratch_types=[plgpu.SMEM((8, 128), jnp.float32), plgpu.Barrier()],
            grid=(2,),
            grid_names=("blocks",),
            interpret=plgpu.InterpretGPUParams(detect_races=True),
        )(jnp.ones((8, 128), jnp.float32))

    np.testing.assert_array_equal(jax.jit(lambda: run(False))(), 2.0)
    try:
        with pytest.raises(RuntimeError, match="RACE DETECTED"):
            jax.block_until_ready(jax.jit(lambda: run(True))())
    finally:
        reset_interpreter()


# ------------------------------------------------------------------ CUDA lowering


def spec(*shape, dtype=BF16):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("heads,kv_heads,d,p_operand,ws", [
    (32, 8, 128, "registers", True), (16, 2, 256, "registers", True),
    (8, 8, 64, "registers", False), (8, 2, 128, "smem", True),
])  # fmt: skip
def test_prefill_lowers_for_cuda(heads, kv_heads, d, p_operand, ws):
    b, t = 2, 300  # T not a multiple of 8: padded to 304; of 64: TMA clips the last block

    def f(q, k, v, lengths):
        return _am().prefill_attention_mgpu(q, k, v, lengths, scale=d**-0.5, p_operand=p_operand,
                                            warp_specialized=ws, return_lse=True)  # fmt: skip

    text = lower_for_cuda(f, spec(b, t, heads, d), spec(b, t, kv_heads, d),
                          spec(b, t, kv_heads, d), spec(b, dtype=jnp.int32))  # fmt: skip
    assert mosaic_kernel_count(text) == 1


@pytest.mark.parametrize("heads,kv_heads,d,dcp", [(32, 8, 128, True), (16, 2, 256, False)])
def test_decode_lowers_for_cuda(heads, kv_heads, d, dcp):
    b, s = 4, 1024

    def f(q, kc, vc, kv_lens):
        positions = jnp.arange(s, dtype=jnp.int32) * 2 + 1 if dcp else None
        return _am().decode_attention_mgpu(q, kc, vc, kv_lens, scale=d**-0.5,
                                           slot_positions=positions, num_splits=4)  # fmt: skip

    text = lower_for_cuda(f, spec(b, heads, d), spec(b, s, kv_heads, d),
                          spec(b, s, kv_heads, d), spec(b, dtype=jnp.int32))  # fmt: skip
    assert mosaic_kernel_count(text) == 1


# ----------------------------------------------------------------------- dispatch


def fake_gpu(monkeypatch, capability: float) -> None:
    """Dispatch sees a GPU of this compute capability (resolution only: nothing compiles)."""
    from jaxpar.kernels_pallas import dispatch

    monkeypatch.setattr(dispatch, "_on_gpu", lambda: True)
    monkeypatch.setattr(dispatch, "_compute_capability", lambda: capability)


def test_dispatch_selects_mosaic_on_hopper_only(monkeypatch):
    """auto: Mosaic GPU on compute capability >= 9.0 where registered, Triton on older GPUs,
    the reference on CPU; a forced Mosaic kernel that cannot run says why."""
    from jaxpar.kernels_pallas import dispatch

    mosaic_ops = ("attention_prefill", "attention_decode", "gated_delta_rule_chunked",
                  "gated_delta_rule_decode")  # fmt: skip
    assert set(dispatch.MOSAIC_KERNELS) == set(mosaic_ops)
    for op in mosaic_ops:
        assert dispatch.resolve_impl("auto", op=op) == "reference"  # CPU
        assert dispatch.resolve_impl("mosaic", interpret=True, op=op) == "mosaic"
        with pytest.raises(dispatch.KernelUnavailableError, match="needs a GPU"):
            dispatch.resolve_impl("mosaic", op=op)
    with pytest.raises(dispatch.KernelUnavailableError, match="no Mosaic GPU kernel"):
        dispatch.resolve_impl("mosaic", interpret=True, op="attention_extend")
    for capability, expected in ((9.0, "mosaic"), (8.0, "triton")):
        fake_gpu(monkeypatch, capability)
        for op in mosaic_ops:
            assert dispatch.resolve_impl("auto", op=op) == expected
    assert dispatch.resolve_impl("auto", op="attention_extend") == "triton"
    with pytest.raises(dispatch.KernelUnavailableError, match="capability >= 9.0"):
        dispatch.resolve_impl("mosaic", op="attention_decode")


def test_dispatch_runs_mosaic_and_falls_back_loudly(monkeypatch):
    from jaxpar.kernels_pallas import dispatch

    rng = np.random.default_rng(11)
    q, kc, vc = randn(rng, 1, 4, 128), randn(rng, 1, 64, 2, 128), randn(rng, 1, 64, 2, 128)
    kv_lens = jnp.array([50], jnp.int32)
    o, lse = dispatch.attention_decode(q, kc, vc, kv_lens, scale=0.1, impl="mosaic",
                                       interpret=True, num_splits=1)  # fmt: skip
    o_ref, lse_ref = decode_ref(q, kc, vc, kv_lens, scale=0.1)
    np.testing.assert_allclose(o, o_ref, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(lse, lse_ref, atol=1e-3, rtol=1e-4)

    # float32 and head_dim 24: forced, the Mosaic kernel raises; under auto on a Hopper GPU
    # it hands over to Triton (which cannot compile here either), then the reference,
    # warning at each step.
    q24, k24 = randn(rng, 1, 4, 24, dtype=jnp.float32), randn(rng, 1, 64, 2, 24, dtype=jnp.float32)
    with pytest.raises(dispatch.UnsupportedShapeError, match="bfloat16 or float16"):
        dispatch.attention_decode(q24, k24, k24, kv_lens, scale=0.1, impl="mosaic",
                                  interpret=True)  # fmt: skip
    fake_gpu(monkeypatch, 9.0)
    with pytest.warns(dispatch.KernelFallbackWarning) as caught:
        o, lse = dispatch.attention_decode(q24, k24, k24, kv_lens, scale=0.1)
    messages = [str(w.message) for w in caught]
    assert "the mosaic kernel cannot run" in messages[0] and "using the triton" in messages[0]
    assert "bfloat16 or float16" in messages[0]
    assert "using the reference" in messages[-1]
    monkeypatch.undo()
    o_ref, lse_ref = decode_ref(q24, k24, k24, kv_lens, scale=0.1)
    np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-6)
