"""KV cache and GDN state dtypes: fp8 (e4m3, per-token-per-head scales computed at write)
read back by the reference and the Triton kernels, under DCP and in the engine; the
recurrent-state dtype; `jaxpar plan` cache bytes; and greedy agreement with float32 on
stories260K's real weights, teacher-forced over 200 positions."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxpar
from jaxpar import cli
from jaxpar.kernels_pallas import dispatch
from jaxpar.kernels_pallas.attention import widen
from jaxpar.kernels_pallas.errors import KernelFallbackWarning, UnsupportedShapeError
from jaxpar.models.cache import FP8, SCALE_DTYPE, CacheDtypeError, CacheDtypes, dequantize_kv, quantize_kv
from jaxpar.models.decoder import init_cache


def _script():
    """scripts/kv_cache_dtype.py: its story and teacher forcing are what the test asserts on."""
    spec = importlib.util.spec_from_file_location("kv_cache_dtype_script", SCRIPTS / "kv_cache_dtype.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
POSITIONS = 200
TPA1_DCP4 = {"axes": {"tp": 4, "attn_tp": 1, "dcp": 4},
             "rules": [{"match": {"kind": "attention"}, "plan": {"tp_size": "attn_tp", "dcp_size": "dcp"}}]}


def test_quantize_kv_bounds_and_round_trip():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 2, 16)).astype(np.float32) * np.float32(10.0) ** rng.integers(-3, 4, (3, 5, 2, 1))
    x[0, 0, 0] = 0.0  # an all-zero vector: scale 1, stored zeros
    q, s = quantize_kv(jnp.asarray(x), FP8)
    assert q.dtype == FP8 and s.dtype == SCALE_DTYPE and s.shape == x.shape[:3]
    assert float(s[0, 0, 0]) == 1.0 and not np.any(np.asarray(q[0, 0, 0], np.float32))
    back = np.asarray(dequantize_kv(q, s))
    amax = np.abs(x).max(-1, keepdims=True)
    # e4m3: 3 mantissa bits (relative error <= 2^-4 for normals), subnormal step 2^-9 of
    # the scale, i.e. amax / 448 * 2^-9; the largest element maps to ~448, never past it.
    assert np.all(np.abs(back - x) <= np.abs(x) * 2.0**-4 + amax / 448 * 2.0**-9 + 1e-30)
    assert np.abs(np.asarray(q, np.float32)).max() <= 448
    # Any other dtype: a plain cast, no scales.
    y, none = quantize_kv(jnp.asarray(x), jnp.bfloat16)
    assert none is None and y.dtype == jnp.bfloat16


def test_widen_decodes_every_fp8_and_bf16_code_exactly():
    """The reference reads fp8 and bf16 caches through integer ops (XLA:CPU's own
    conversion is slow): every fp8 code but NaN (never stored) gives the float32 value,
    signed zeros included; every bf16 code gives the same float32 bits."""
    codes = jax.lax.bitcast_convert_type(jnp.arange(256, dtype=jnp.uint8), FP8)
    got, want = np.asarray(jax.jit(widen)(codes)), np.asarray(codes.astype(jnp.float32))
    finite = ~np.isnan(want)
    assert finite.sum() == 254
    np.testing.assert_array_equal(got[finite], want[finite])
    np.testing.assert_array_equal(np.signbit(got[finite]), np.signbit(want[finite]))
    # bfloat16 (the top half of a float32): every one of its 65536 codes, NaNs staying NaN.
    bf16 = jax.lax.bitcast_convert_type(jnp.arange(65536, dtype=jnp.uint32).astype(jnp.uint16), jnp.bfloat16)
    got, want = np.asarray(jax.jit(widen)(bf16)), np.asarray(bf16.astype(jnp.float32))
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def _scaled_case(seed: int, b=2, s=32, kvh=2, h=4, d=16, t=5):
    rng = np.random.default_rng(seed)
    k, v = (jnp.asarray(rng.standard_normal((b, s, kvh, d)), jnp.float32) * 3 for _ in range(2))
    (kq, ks), (vq, vs) = quantize_kv(k, FP8), quantize_kv(v, FP8)
    q_dec = jnp.asarray(rng.standard_normal((b, h, d)), jnp.float32)
    q_ext = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    return dict(kq=kq, ks=ks, vq=vq, vs=vs, kd=dequantize_kv(kq, ks), vd=dequantize_kv(vq, vs),
                q_dec=q_dec, q_ext=q_ext, t=t)


# Triton kernels run in the Pallas interpreter here (the GPU check runs them compiled).
@pytest.mark.parametrize("impl, interpret", [("reference", False), ("triton", True)])
def test_scaled_fp8_cache_attention_equals_the_dequantised_cache(impl, interpret):
    c = _scaled_case(0)
    scale = 0.25
    kv_lens = jnp.array([19, 32], jnp.int32)
    # Jitted: one compile per call instead of one per operation.
    decode, extend = jax.jit(dispatch.attention_decode, static_argnames=("scale", "impl", "interpret")), \
        jax.jit(dispatch.attention_extend, static_argnames=("scale", "impl", "interpret", "dcp_size"))
    got = decode(c["q_dec"], c["kq"], c["vq"], kv_lens, scale=scale, k_scale=c["ks"],
                 v_scale=c["vs"], impl=impl, interpret=interpret)
    want = decode(c["q_dec"], c["kd"], c["vd"], kv_lens, scale=scale, impl="reference")
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5)
    # Extend (chunked prefill) as DCP rank 1 of 2: slot i holds position 2 i + 1.
    positions = jnp.asarray([[20, 21, 22, 23, 24], [50, 51, 52, 53, 54]], jnp.int32)
    kw = dict(scale=scale, dcp_rank=1, dcp_size=2)
    lens = positions[:, -1] + 1
    got = extend(c["q_ext"], c["kq"], c["vq"], positions, lens, k_scale=c["ks"], v_scale=c["vs"], impl=impl,
                 interpret=interpret, **kw)
    want = extend(c["q_ext"], c["kd"], c["vd"], positions, lens, impl="reference", **kw)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5)


def test_a_kernel_without_scale_inputs_is_never_silently_wrong(monkeypatch):
    """A kernel that cannot take a scaled cache raises UnsupportedShapeError when forced,
    and `auto` falls back to the next implementation, loudly."""
    c = _scaled_case(1)

    def unscaled_kernel(q, k_cache, v_cache, kv_lens, *, scale, interpret=False):
        raise AssertionError("called with a scaled cache it cannot read")

    monkeypatch.setitem(dispatch.TRITON_KERNELS, "attention_decode", unscaled_kernel)
    kv_lens = jnp.array([7, 32], jnp.int32)
    args = (c["q_dec"], c["kq"], c["vq"], kv_lens)
    kw = dict(scale=0.5, k_scale=c["ks"], v_scale=c["vs"], interpret=True)
    with pytest.raises(UnsupportedShapeError, match="does not take k_scale, v_scale"):
        dispatch.attention_decode(*args, impl="triton", **kw)
    with pytest.warns(KernelFallbackWarning, match="using the reference implementation"):
        got = dispatch.attention_decode(*args, impl="auto", **kw)
    want = dispatch.attention_decode(c["q_dec"], c["kd"], c["vd"], kv_lens, scale=0.5, impl="reference")
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=2e-5, atol=2e-5)


@pytest.fixture(scope="module")
def stories(stories_dir):
    return jaxpar.load(stories_dir, progress=False)


def test_fp8_kv_greedy_matches_float32_on_stories260k(stories, capsys):
    script = _script()
    tokens = stories.encode(script.STORY)[:POSITIONS]
    assert len(tokens) == POSITIONS
    ref_decode, ref_extend = script.teacher_forced_argmax(stories, tokens, "float32")
    # The float32 cache: decode and extend give the same greedy tokens everywhere.
    assert np.mean(ref_decode == ref_extend) == 1.0
    dec, ext = script.teacher_forced_argmax(stories, tokens, "float8_e4m3fn")
    agree = float(np.mean(dec == ref_decode)), float(np.mean(ext == ref_extend))
    with capsys.disabled():  # the figure (bfloat16 too: scripts/kv_cache_dtype.py)
        print(f"\nstories260K: fp8 KV greedy tokens equal float32's at {agree[0]:.1%} (decode) / "
              f"{agree[1]:.1%} (extend) of {POSITIONS} teacher-forced positions")
    assert min(agree) >= 0.9


def test_fp8_kv_generate_under_dcp_equals_one_device(stories_dir, stories):
    """Each rank quantises the tokens it stores with the same per-token scales, so the DCP
    cache holds exactly the one-device cache's values, split by position."""
    prompts = [stories.encode("Once upon a time"), stories.encode("The little dog")]
    one = jaxpar.load(stories_dir, progress=False, kv_cache_dtype="fp8").generate(prompts, 24, ignore_eos=True)
    dcp = jaxpar.load(stories_dir, progress=False, kv_cache_dtype="fp8", policy=TPA1_DCP4,
                      devices=jax.devices()[:4])
    assert dcp.cache_dtypes.kv == FP8
    assert dcp.generate(prompts, 24, ignore_eos=True).token_ids == one.token_ids


def _greedy_after_extend(model, prompts: list[list[int]], steps: int, kv_cache_dtype: str) -> list[list[int]]:
    """The engine's computation on one device in one program: the prompts (right-padded)
    through extend, then `steps` greedy decode steps, over a `kv_cache_dtype` cache."""
    graphdef, state = nnx.split(model.module)
    cache = init_cache(model.cfg, model.sharding, len(prompts), 64, CacheDtypes.resolve(model.dtype, kv_cache_dtype))
    width = max(map(len, prompts))
    tokens = jnp.asarray([p + [0] * (width - len(p)) for p in prompts], jnp.int32)
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)

    @jax.jit
    def run(state, tokens, lengths, cache):
        lm = nnx.merge(graphdef, state)
        positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), tokens.shape)
        logits, cache = lm(tokens, positions, cache, lengths, mode="extend", last_only=True)

        def step(carry, _):
            tok, cache = carry
            logits, cache = lm(tok[:, None], cache.lengths[:, None], cache, jnp.ones_like(lengths),
                               mode="decode", last_only=True)
            return (jnp.argmax(logits, -1).astype(jnp.int32), cache), tok

        first = jnp.argmax(logits, -1).astype(jnp.int32)
        return jax.lax.scan(step, (first, cache), None, length=steps)[1].T

    return np.asarray(run(state, tokens, lengths, cache)).tolist()


def test_engine_fp8_kv_pd_to_dcp(stories):
    """The engine's chunked prefill (extend, 4-way TP) writes fp8 with scales, the transfer
    moves the scales with their slots (reordered into the DCP layout), decode (DCP over 4
    devices) reads them: the greedy tokens of the same computation on one device."""
    rng = np.random.default_rng(3)
    # Prompts of one chunk each (one compiled chunk program).
    prompts = [rng.integers(3, stories.cfg.vocab_size, size=int(n)).tolist() for n in (9, 16, 13)]
    budgets = [8, 5, 8]
    devices = jax.devices()
    pd = jaxpar.Engine(stories, max_slots=4, max_len=64, prefill_chunk=16, prefill_policy={"axes": {"tp": 4}},
                       prefill_devices=devices[:4], decode_policy=TPA1_DCP4, decode_devices=devices[4:],
                       kv_cache_dtype="fp8")
    expected = [t[:b] for t, b in zip(_greedy_after_extend(stories, prompts, max(budgets), "fp8"), budgets)]
    assert pd.generate(prompts, budgets, ignore_eos=True).token_ids == expected
    layer = pd._scheduler.decode.cache.layers[0]
    assert layer.k.dtype == FP8 and layer.k_scale.dtype == SCALE_DTYPE
    # [slots, 64 tokens, 4 kv heads]: tokens over the 4 DCP ranks, scales like their values.
    assert {s.data.shape for s in layer.k_scale.addressable_shards} == {(4, 16, 4)}


def test_state_dtype_reaches_the_gdn_cache(tmp_path):
    from tests import hf_models

    path = hf_models.write_tiny("qwen3_5", tmp_path / "qwen3_5")  # 3 GDN : 1 attention
    model = jaxpar.load(path, tokenizer=False, progress=False, state_dtype="bfloat16", kv_cache_dtype="fp8")
    assert model.cache_dtypes == CacheDtypes(kv=FP8, conv=jnp.dtype(jnp.float32), state=jnp.dtype(jnp.bfloat16))
    assert model._generator.cache_dtype is model.cache_dtypes  # what generate allocates
    # The engine allocates its slots' cache in the loaded model's dtypes, or its own.
    for state, kwargs in ((jnp.bfloat16, {}), (jnp.float32, {"state_dtype": "float32"})):
        engine = jaxpar.Engine(model, max_slots=2, max_len=32, prefill_chunk=16, **kwargs)
        gdn, attention = engine._scheduler.decode.cache.layers[:4:3]
        assert gdn.recurrent.dtype == state and gdn.conv_q.dtype == jnp.float32
        assert attention.k.dtype == FP8 and attention.v_scale.dtype == SCALE_DTYPE
    # `jaxpar plan` counts the states in the chosen dtype (the recurrent state halves).
    from jaxpar.sharding.inspect import plan

    states = {d: plan(path, "tp", devices=jax.devices()[:1], collectives=False, dtype="float32",
                      state_dtype=d).cache_bytes_by_part["state"] for d in ("float32", "bfloat16")}
    recurrent = model.cfg.linear_num_value_heads * model.cfg.linear_key_head_dim * model.cfg.linear_value_head_dim
    assert states["float32"] - states["bfloat16"] == 3 * recurrent * 2  # 3 GDN layers, batch 1
    # Mamba2 (Nemotron-H): its SSM state follows state_dtype too.
    nh = hf_models.write_tiny("nemotron_h", tmp_path / "nemotron_h")
    report = {d: plan(nh, "tp", devices=jax.devices()[:1], collectives=False, dtype="float32",
                      state_dtype=d) for d in ("float32", "bfloat16")}
    assert report["bfloat16"].cache_dtypes["state"] == "bfloat16"
    assert report["bfloat16"].cache_bytes_by_part["state"] < report["float32"].cache_bytes_by_part["state"]


def test_bad_cache_dtypes_fail_before_loading(stories_dir):
    with pytest.raises(CacheDtypeError, match="kv_cache_dtype 'int4' is not supported"):
        jaxpar.load(stories_dir, kv_cache_dtype="int4")
    with pytest.raises(CacheDtypeError, match="state_dtype"):
        jaxpar.load(stories_dir, state_dtype="float8_e4m3fn")
    assert issubclass(CacheDtypeError, ValueError)
    # Pipeline stages keep one dtype for activations and caches: anything else is refused
    # (before the weights load).
    with pytest.raises(CacheDtypeError, match="pipeline stages"):
        jaxpar.load(stories_dir, policy={"axes": {"pp": 2}}, devices=jax.devices()[:2], kv_cache_dtype="fp8",
                    progress=False)


def test_plan_cache_bytes_halve_with_fp8(tmp_path, capsys):
    """SmolLM2-135M's config (head_dim 64): the fp8 cache's values are half the bf16
    cache's bytes; with its per-token scales (2 bytes per 64) the whole is 0.516x."""
    reports = {}
    for kv in ("bfloat16", "fp8"):
        out = tmp_path / f"{kv}.json"
        code = cli.main(["plan", "smollm2-135m", "--devices", "1", "--no-collectives", "--seq", "1024",
                         "--kv-cache-dtype", kv, "--json", str(out)])
        assert code == 0
        reports[kv] = json.loads(out.read_text())
    text = capsys.readouterr().out
    assert "KV float8_e4m3fn" in text and "+ scales" in text
    bf16, fp8 = reports["bfloat16"], reports["fp8"]
    assert fp8["cache_bytes_by_part"]["kv"] * 2 == bf16["cache_bytes_by_part"]["kv"]
    ratio = fp8["cache_bytes_per_device"] / bf16["cache_bytes_per_device"]
    assert 0.5 < ratio <= 66 / 128 + 1e-4
    assert fp8["cache_dtypes"] == {"kv": "float8_e4m3fn"}


def test_cli_generate_passes_cache_dtypes_to_load(capsys, stories_dir, monkeypatch):
    seen = {}

    def load(*args, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop after load's arguments")
    monkeypatch.setattr(jaxpar, "load", load)
    code = cli.main(["generate", "--model", str(stories_dir), "--prompt", "Once", "--kv-cache-dtype", "fp8",
                     "--state-dtype", "bfloat16"])
    assert code == 2 and seen["kv_cache_dtype"] == "fp8" and seen["state_dtype"] == "bfloat16"
    with pytest.raises(SystemExit):
        cli.main(["generate", "--prompt", "x", "--kv-cache-dtype", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err
