"""Kernel dispatch: which implementation each impl request runs, loud fallbacks for rejected
shapes and compile failures, Mosaic GPU registration, and the per-operation override
threaded through the models (RuntimeOptions.kernel_impl)."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpar.kernels_pallas import attention as attn_ref
from jaxpar.kernels_pallas import dispatch
from jaxpar.kernels_pallas import gated_delta_rule as gdn_ref
from jaxpar.models.options import RuntimeOptions

pytestmark = pytest.mark.skipif(jax.default_backend() == "gpu", reason="tests the CPU dispatch")


def gdn_inputs(b=1, t=8, hk=1, hv=1, dk=16, dv=16, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    return (f(b, t, hk, dk), f(b, t, hk, dk), f(b, t, hv, dv),
            -0.3 * jnp.abs(f(b, t, hv)), jax.nn.sigmoid(f(b, t, hv)))  # fmt: skip


def decode_inputs(seed=1):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    return f(2, 4, 16), f(2, 32, 2, 16), f(2, 32, 2, 16), jnp.array([32, 7], jnp.int32)


def test_resolution_on_cpu():
    for op in dispatch.OPS:
        assert dispatch.resolve_impl("auto", op=op) == "reference"
        assert dispatch.resolve_impl("auto", interpret=True, op=op) == "triton"
        assert dispatch.resolve_impl("reference", op=op) == "reference"
        with pytest.raises(dispatch.KernelUnavailableError, match="needs a GPU"):
            dispatch.resolve_impl("triton", op=op)
        # Registered Mosaic GPU kernels need a Hopper GPU (and jax >= 0.11) when compiled.
        with pytest.raises(dispatch.KernelUnavailableError,
                           match="no Mosaic GPU kernel|needs a GPU|need jax"):  # fmt: skip
            dispatch.resolve_impl("mosaic", op=op)
    assert dispatch.PallasUnavailableError is dispatch.KernelUnavailableError
    with pytest.warns(DeprecationWarning, match="use 'triton'"):
        assert dispatch.resolve_impl("pallas", interpret=True) == "triton"
    with pytest.raises(ValueError, match="impl must be one of"):
        dispatch.resolve_impl("cuda")
    with pytest.raises(ValueError, match="unknown kernel operation"):
        dispatch.resolve_impl("auto", op="attention_encode")


def test_forced_impl_without_gpu_raises_at_the_call():
    q, k, v, g, beta = gdn_inputs()
    with pytest.raises(dispatch.KernelUnavailableError, match="gated_delta_rule_chunked.*needs a GPU"):
        dispatch.gated_delta_rule_chunked(q, k, v, g, beta, impl="triton")


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretends the backend is a GPU of a given compute capability (resolution only)."""

    def set_gpu(capability: float, jax_version=(0, 12)):
        monkeypatch.setattr(dispatch, "_on_gpu", lambda: True)
        monkeypatch.setattr(dispatch, "_compute_capability", lambda: capability)
        monkeypatch.setattr(dispatch, "_jax_version", lambda: jax_version)

    return set_gpu


def test_mosaic_registration_is_one_line(monkeypatch, fake_gpu):
    """A "module:function" entry makes auto pick Mosaic GPU where it is supported."""
    fake_gpu(9.0)
    assert dispatch.resolve_impl("auto", op="attention_extend") == "triton"
    monkeypatch.setitem(dispatch.MOSAIC_KERNELS, "attention_extend",
                        "jaxpar.kernels_pallas.attention:extend_attention")  # fmt: skip
    assert dispatch.resolve_impl("auto", op="attention_extend") == "mosaic"
    assert dispatch.implementations("attention_extend")["mosaic"] is attn_ref.extend_attention
    assert dispatch.resolve_impl("auto", op="attention_prefill") == "mosaic"  # registered
    fake_gpu(8.0)  # Ampere: Triton, and a forced Mosaic GPU says why not
    assert dispatch.resolve_impl("auto", op="attention_decode") == "triton"
    with pytest.raises(dispatch.KernelUnavailableError, match="compute capability >= 9.0"):
        dispatch.resolve_impl("mosaic", op="attention_decode")
    fake_gpu(9.0, jax_version=(0, 10))
    assert dispatch.resolve_impl("auto", op="attention_decode") == "triton"
    with pytest.raises(dispatch.KernelUnavailableError, match="jax >= 0.11"):
        dispatch.resolve_impl("mosaic", op="attention_decode")
    fake_gpu(9.0)
    monkeypatch.setitem(dispatch.MOSAIC_KERNELS, "attention_decode",
                        "jaxpar.kernels_pallas.no_such_mgpu:decode")  # fmt: skip
    assert dispatch.resolve_impl("auto", op="attention_decode") == "triton"
    with pytest.raises(dispatch.KernelUnavailableError, match="cannot import"):
        dispatch.resolve_impl("mosaic", op="attention_decode")


def test_rejected_shape_falls_back_loudly():
    args = gdn_inputs(dk=24)  # Dk = 24 is not a power of two
    run = jax.jit(dispatch.gated_delta_rule_chunked, static_argnames=("impl", "interpret"))
    with pytest.raises(dispatch.UnsupportedShapeError, match="Dk=24"):
        run(*args, impl="triton", interpret=True)
    with pytest.warns(dispatch.KernelFallbackWarning, match="gated_delta_rule_chunked.*Dk=24"):
        o, _ = run(*args, impl="auto", interpret=True)
    np.testing.assert_allclose(o, jax.jit(gdn_ref.chunk_gated_delta_rule)(*args)[0], 1e-5, 1e-5)


def test_compile_failure_falls_back_loudly(monkeypatch):
    """On a (pretend) GPU each kernel is compiled alone first: here the Triton kernel cannot
    compile (non-interpreted Pallas on the CPU), so auto runs the reference with a warning
    and a forced impl raises KernelCompileError."""
    monkeypatch.setattr(dispatch, "_on_gpu", lambda: True)
    monkeypatch.setattr(dispatch, "_compute_capability", lambda: 8.0)  # Triton first
    monkeypatch.setattr(dispatch, "_COMPILED", {})
    q, kc, vc, kv_lens = decode_inputs()
    with pytest.warns(dispatch.KernelFallbackWarning, match="attention_decode: the triton kernel"
                      ".*failed to compile"):  # fmt: skip
        o, lse = dispatch.attention_decode(q, kc, vc, kv_lens, scale=0.25)
    o_r, lse_r = attn_ref.decode_attention(q, kc, vc, kv_lens, scale=0.25)
    np.testing.assert_allclose(o, o_r, 1e-5, 1e-5)
    with pytest.raises(dispatch.KernelCompileError, match="failed to compile"):
        dispatch.attention_decode(q, kc, vc, kv_lens, scale=0.25, impl="triton")
    assert len(dispatch._COMPILED) == 1  # compiled once per signature, failure remembered


def test_compile_check_inside_shard_map(monkeypatch):
    """The standalone compile of a kernel works on traced arguments inside shard_map (the
    model calls decode attention there); a successful compile runs the kernel."""
    monkeypatch.setattr(dispatch, "_needs_compile_check", lambda interpret: True)
    monkeypatch.setattr(dispatch, "_COMPILED", {})
    q, kc, vc, kv_lens = decode_inputs()
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("b",))
    spec = jax.sharding.PartitionSpec("b")

    def local(q, kc, vc, kv_lens):
        return dispatch.attention_decode(q, kc, vc, kv_lens, scale=0.25, interpret=True,
                                         block_k=16, num_splits=2)  # fmt: skip

    with warnings.catch_warnings():
        warnings.simplefilter("error", dispatch.KernelFallbackWarning)
        o, _ = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 4,
                                     out_specs=(spec, spec), check_vma=False))(q, kc, vc, kv_lens)  # fmt: skip
    np.testing.assert_allclose(o, attn_ref.decode_attention(q, kc, vc, kv_lens, scale=0.25)[0],
                               1e-5, 1e-5)  # fmt: skip
    assert list(dispatch._COMPILED.values()) == [None]


# ------------------------------------------------------------------- RuntimeOptions


def test_runtime_options_per_operation():
    opts = RuntimeOptions(kernel_impl={"attention_decode": "reference", "default": "triton"})
    assert opts.impl_for("attention_decode") == "reference"
    assert opts.impl_for("gated_delta_rule_chunked") == "triton"
    assert RuntimeOptions(kernel_impl={"attention_decode": "reference"}).impl_for("attention_prefill") == "auto"
    assert RuntimeOptions().impl_for("attention_decode") == "auto"
    hash(opts)  # options are static state of the compiled program
    assert opts == RuntimeOptions(kernel_impl={"default": "triton", "attention_decode": "reference"})
    with pytest.raises(ValueError, match="unknown operation 'attention'"):
        RuntimeOptions(kernel_impl={"attention": "reference"})
    with pytest.raises(ValueError, match="impl must be one of"):
        RuntimeOptions(kernel_impl={"attention_decode": "fast"})
    with pytest.raises(ValueError, match="impl must be one of"):
        RuntimeOptions(kernel_impl="fast")


HYBRID = dict(
    model_type="qwen3_next", vocab_size=64, hidden_size=32, intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
    linear_value_head_dim=16, linear_conv_kernel_dim=4,
    layer_types=["linear_attention", "full_attention"], num_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=16, shared_expert_intermediate_size=16, decoder_sparse_step=1,
    rope_parameters={"rope_theta": 1e6, "partial_rotary_factor": 0.25, "rope_type": "default"},
)  # fmt: skip


def test_model_threads_the_impl_of_each_operation(monkeypatch):
    """Tracing a hybrid model's prefill / extend / decode asks dispatch for each operation
    with the impl RuntimeOptions names for it (abstract shapes: nothing is computed)."""
    from jaxpar.api import make_sharding
    from jaxpar.config import config_from_hf_dict
    from jaxpar.models.decoder import CausalLM, cache_shapes

    calls = {}
    real_run = dispatch._run

    def spy(op, impl, *args, **kwargs):
        calls[op] = impl
        return real_run(op, "reference", *args, **kwargs)

    monkeypatch.setattr(dispatch, "_run", spy)
    cfg = config_from_hf_dict(HYBRID)
    sharding = make_sharding(cfg)
    table = {"attention_decode": "triton", "gated_delta_rule_chunked": "mosaic",
             "default": "reference"}  # fmt: skip
    model = nnx.eval_shape(lambda: CausalLM(cfg, jnp.float32, sharding, RuntimeOptions(table)))
    graphdef, state = nnx.split(model)
    cache = cache_shapes(cfg, sharding, 1, 32, jnp.float32)

    def step(state, tokens, cache, mode):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        lengths = jnp.full((1,), tokens.shape[1], jnp.int32)
        return nnx.merge(graphdef, state)(tokens, positions, cache, lengths, mode=mode)

    for mode, t in (("prefill", 8), ("extend", 8), ("decode", 1)):
        jax.eval_shape(functools.partial(step, mode=mode), state,
                       jax.ShapeDtypeStruct((1, t), jnp.int32), cache)  # fmt: skip
    assert calls == {
        "attention_prefill": "reference", "attention_extend": "reference",
        "attention_decode": "triton", "gated_delta_rule_chunked": "mosaic",
        "gated_delta_rule_decode": "reference",
    }  # fmt: skip
