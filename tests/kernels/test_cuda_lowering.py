"""Lower every Pallas kernel configuration for CUDA on a machine without a GPU.

``jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))`` runs the Pallas -> Triton
lowering (the step that rejects unsupported primitives, non-power-of-two tiles, bad dot
shapes, ...) and emits one ``__gpu$xla.gpu.triton`` custom call per kernel carrying the
Triton IR. Each captured Triton module is also run through the MLIR verifier.

Not covered without a GPU: Triton's own TTIR -> TTGIR -> PTX compilation, which XLA runs
inside the CUDA PJRT plugin at compile time (the plugin is not installed here, and
``jax._src.lib.triton.compile`` has no CUDA handler registered without it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax._src.pallas.triton import pallas_call_registration as triton_registration

from jaxpar.kernels_pallas import attention_pallas as attn
from jaxpar.kernels_pallas import gated_delta_rule_pallas as gdn

TRITON_CALL = "__gpu$xla.gpu.triton"


@pytest.fixture
def triton_modules(monkeypatch):
    """Captures (and later verifies) every Triton module the lowering builds."""
    captured = []
    original = triton_registration.lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = original(*args, **kwargs)
        captured.append(result.module)
        return result

    monkeypatch.setattr(triton_registration.lowering, "lower_jaxpr_to_triton_module", capture)
    return captured


def lower_for_cuda(fn, *args):
    """Lowers fn(*args) for CUDA and returns the StableHLO text."""
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def assert_triton_kernels(text: str, modules: list, expected: int):
    assert text.count(TRITON_CALL) == expected, f"expected {expected} Triton custom calls"
    assert len(modules) == expected
    for module in modules:
        assert module.operation.verify()
        assert "tt.func" in str(module)  # a real Triton function body was emitted


def spec(*shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


# Qwen3-Next / Qwen3.5 GDN per tensor-parallel rank: Dk = Dv = 128, Hk | Hv.
GDN_CONFIGS = [
    dict(hk=2, hv=8, dtype=jnp.bfloat16),
    dict(hk=4, hv=16, dtype=jnp.bfloat16),
    dict(hk=4, hv=8, dtype=jnp.float32),
    dict(hk=16, hv=32, dtype=jnp.bfloat16),
]


def gdn_id(cfg: dict) -> str:
    return f"hk{cfg['hk']}-hv{cfg['hv']}-{jnp.dtype(cfg['dtype']).name}"


@pytest.mark.parametrize("cfg", GDN_CONFIGS, ids=gdn_id)
def test_gdn_chunked_lowers(cfg, triton_modules):
    b, t, d = 2, 200, 128
    args = (
        spec(b, t, cfg["hk"], d, dtype=cfg["dtype"]),
        spec(b, t, cfg["hk"], d, dtype=cfg["dtype"]),
        spec(b, t, cfg["hv"], d, dtype=cfg["dtype"]),
        spec(b, t, cfg["hv"], dtype=jnp.float32),
        spec(b, t, cfg["hv"], dtype=jnp.float32),
        spec(b, cfg["hv"], d, d, dtype=jnp.float32),
        spec(b, dtype=jnp.int32),
    )

    def f(q, k, v, g, beta, s0, lengths):
        return gdn.chunk_gated_delta_rule_pallas(
            q, k, v, g, beta, initial_state=s0, lengths=lengths, chunk_size=64
        )

    assert_triton_kernels(lower_for_cuda(f, *args), triton_modules, expected=2)


@pytest.mark.parametrize("cfg", GDN_CONFIGS[:3], ids=gdn_id)
def test_gdn_decode_step_lowers(cfg, triton_modules):
    b, d = 4, 128
    args = (
        spec(b, cfg["hk"], d, dtype=cfg["dtype"]),
        spec(b, cfg["hk"], d, dtype=cfg["dtype"]),
        spec(b, cfg["hv"], d, dtype=cfg["dtype"]),
        spec(b, cfg["hv"], dtype=jnp.float32),
        spec(b, cfg["hv"], dtype=jnp.float32),
        spec(b, cfg["hv"], d, d, dtype=jnp.float32),
    )
    text = lower_for_cuda(gdn.gated_delta_rule_step_pallas, *args)
    assert_triton_kernels(text, triton_modules, expected=1)


@pytest.mark.parametrize("state_len", [4, 3])
def test_gdn_fused_conv_decode_lowers(state_len, triton_modules):
    b, hk, hv, d, ksize = 4, 4, 8, 128, 4
    channels = 2 * hk * d + hv * d
    args = (
        spec(b, channels),
        spec(b, channels, state_len),
        spec(channels, ksize),
        spec(channels),
        spec(b, hv, dtype=jnp.float32),
        spec(b, hv, dtype=jnp.float32),
        spec(b, hv, d, d, dtype=jnp.float32),
    )

    def f(*a):
        return gdn.fused_conv_gdn_decode_step_pallas(
            *a, num_k_heads=hk, head_k_dim=d, num_v_heads=hv
        )

    assert_triton_kernels(lower_for_cuda(f, *args), triton_modules, expected=1)


# (H, KVH, D): Llama/Qwen3 GQA shapes, and Qwen3-Next gated attention per rank.
ATTN_CONFIGS = [(32, 8, 128), (16, 2, 64), (8, 8, 64), (16, 4, 128)]


@pytest.mark.parametrize("heads,kv_heads,d", ATTN_CONFIGS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=lambda d: jnp.dtype(d).name)
def test_prefill_attention_lowers(heads, kv_heads, d, dtype, triton_modules):
    b, t = 2, 300
    args = (spec(b, t, heads, d, dtype=dtype), spec(b, t, kv_heads, d, dtype=dtype),
            spec(b, t, kv_heads, d, dtype=dtype), spec(b, dtype=jnp.int32))  # fmt: skip

    def f(q, k, v, lengths):
        return attn.prefill_attention_pallas(
            q, k, v, lengths, scale=d**-0.5, block_q=64, block_k=64, num_warps=4 if d <= 64 else 8
        )

    assert_triton_kernels(lower_for_cuda(f, *args), triton_modules, expected=1)


@pytest.mark.parametrize("heads,kv_heads,d", ATTN_CONFIGS)
@pytest.mark.parametrize("num_splits,positions", [(1, False), (4, False), (2, True)])
def test_decode_attention_lowers(heads, kv_heads, d, num_splits, positions, triton_modules):
    b, s = 4, 1024
    args = [spec(b, heads, d), spec(b, s, kv_heads, d), spec(b, s, kv_heads, d),
            spec(b, dtype=jnp.int32)]  # fmt: skip
    if positions:
        args.append(spec(s, dtype=jnp.int32))

    def f(q, k, v, kv_lens, slot_positions=None):
        return attn.decode_attention_pallas(
            q, k, v, kv_lens, scale=d**-0.5, slot_positions=slot_positions,
            block_k=64, num_splits=num_splits,
        )  # fmt: skip

    assert_triton_kernels(lower_for_cuda(f, *args), triton_modules, expected=1)


def test_lowering_rejects_what_triton_cannot_do():
    """Guards this file's premise: a kernel Triton cannot lower fails here, on CPU."""
    from jax.experimental import pallas as pl

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] + x_ref[...][:, 0][:, None]  # static value slice: no Triton rule

    def f(x):
        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
            compiler_params=attn.triton_params(num_warps=4, num_stages=1),
        )(x)

    with pytest.raises(NotImplementedError, match="Pallas Triton lowering: slice"):
        lower_for_cuda(f, spec(16, 16, dtype=jnp.float32))
