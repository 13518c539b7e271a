"""Mamba2 SSD references: the chunked scan against the token-by-token recurrence and against
Hugging Face's torch implementations (transformers' Nemotron-H chunk scan and selective
state update), ragged rows, and the decode step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpar.kernels_pallas import ssd

chunked = jax.jit(ssd.ssd_chunked, static_argnames="chunk_size")
recurrent = jax.jit(ssd.ssd_recurrent)


def inputs(b=2, t=37, h=8, p=4, g=2, n=6, seed=0):
    """Raw dt (before softplus), a decay rate per head, and a random initial state."""
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return dict(x=f(b, t, h, p), dt_raw=f(b, t, h), dt_bias=f(h), A=-np.exp(f(h)), B=f(b, t, g, n),
                C=f(b, t, g, n), D=f(h), s0=0.5 * f(b, h, p, n))


def step_sizes(x, dt_min=1e-3):
    return jnp.maximum(jax.nn.softplus(x["dt_raw"] + x["dt_bias"]), dt_min)


def run(fn, x, **kw):
    return fn(x["x"], step_sizes(x), x["A"], x["B"], x["C"], D=x["D"], initial_state=x["s0"], **kw)


@pytest.mark.parametrize("chunk_size", [8, 16, 64])
def test_chunked_equals_recurrent(chunk_size):
    """T = 37: several chunks and a partial last one (and one chunk larger than T)."""
    x = inputs()
    y, s = run(chunked, x, chunk_size=chunk_size)
    y_r, s_r = run(recurrent, x)
    np.testing.assert_allclose(y, y_r, rtol=1e-4, atol=1e-4 * np.abs(y_r).max())
    np.testing.assert_allclose(s, s_r, rtol=1e-4, atol=1e-4 * np.abs(s_r).max())


def test_ragged_rows_equal_rows_alone():
    """Past a row's length the state is untouched (dt = 0), so the final state is the
    row's own and its valid outputs are unchanged."""
    x = inputs(t=21)
    lengths = jnp.array([21, 11], jnp.int32)
    y, s = run(chunked, x, lengths=lengths, chunk_size=8)
    alone = {**x, "s0": x["s0"][1:]}
    for key in ("x", "dt_raw", "B", "C"):  # row 1's first 11 tokens
        alone[key] = x[key][1:, :11]
    y1, s1 = run(chunked, alone, chunk_size=8)
    np.testing.assert_allclose(s[1], s1[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y[1, :11], y1[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run(recurrent, x, lengths=lengths)[1], s, rtol=1e-4, atol=1e-5)


def test_decode_steps_continue_the_scan():
    x = inputs(t=12)
    y, s = run(chunked, x, chunk_size=8)
    head = {k: (v[:, :9] if k in ("x", "dt_raw", "B", "C") else v) for k, v in x.items()}
    _, state = run(chunked, head, chunk_size=8)
    dt = step_sizes(x)
    step = jax.jit(ssd.ssd_step)
    for t in range(9, 12):
        y_t, state = step(x["x"][:, t], dt[:, t], x["A"], x["B"][:, t], x["C"][:, t], state, D=x["D"])
        np.testing.assert_allclose(y_t, y[:, t], rtol=1e-4, atol=1e-4 * np.abs(y).max())
    np.testing.assert_allclose(state, s, rtol=1e-4, atol=1e-4 * np.abs(s).max())


def hf_module():
    pytest.importorskip("torch", reason="the Hugging Face reference needs torch")
    from transformers.models.nemotron_h import modeling_nemotron_h

    return modeling_nemotron_h


def test_chunked_matches_hf():
    """transformers' chunk scan takes raw dt, adds dt_bias, applies softplus and clamps at
    time_step_min itself; ours takes the step sizes."""
    hf = hf_module()
    import torch

    x = inputs()
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    y_hf, s_hf = hf.mamba2_chunk_scan(t["x"], t["dt_raw"], t["A"], t["B"], t["C"], 16, D=t["D"],
                                      dt_bias=t["dt_bias"], initial_states=t["s0"], dt_softplus=True,
                                      dt_limit=(1e-3, float("inf")), return_final_states=True)
    y, s = run(chunked, x, chunk_size=16)
    np.testing.assert_allclose(y, y_hf.numpy(), rtol=1e-4, atol=1e-4 * np.abs(y_hf.numpy()).max())
    np.testing.assert_allclose(s, s_hf.numpy(), rtol=1e-4, atol=1e-4 * np.abs(s_hf.numpy()).max())


def test_step_matches_hf():
    """transformers' selective state update works per channel (dt, A, D broadcast over P)."""
    hf = hf_module()
    import torch

    x = inputs(t=1)
    b, _, h, p = x["x"].shape
    state = torch.from_numpy(x["s0"].copy())
    per_channel = lambda v: torch.from_numpy(v)[..., None].expand(*v.shape, p)  # noqa: E731
    y_hf = hf.mamba2_selective_state_update(
        state, torch.from_numpy(x["x"][:, 0]), per_channel(x["dt_raw"][:, 0]),
        per_channel(x["A"])[..., None].expand(h, p, x["B"].shape[-1]), torch.from_numpy(x["B"][:, 0]),
        torch.from_numpy(x["C"][:, 0]), per_channel(x["D"]), dt_bias=per_channel(x["dt_bias"]),
        dt_softplus=True)  # fmt: skip
    dt = jax.nn.softplus(x["dt_raw"][:, 0] + x["dt_bias"])  # HF's step does not clamp
    y, s = ssd.ssd_step(x["x"][:, 0], dt, x["A"], x["B"][:, 0], x["C"][:, 0], x["s0"], D=x["D"])
    np.testing.assert_allclose(y, y_hf.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s, state.numpy(), rtol=1e-5, atol=1e-5)
