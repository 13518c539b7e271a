"""Matmuls of half-precision weights: float32 accumulation, and no float32 copy of a weight
inside the compiled decode step (XLA:CPU makes one for a bfloat16 matrix-vector product
or a transposed bfloat16 operand unless `jaxpar.models.linear.matmul` avoids it)."""

from __future__ import annotations

import re

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxpar
from jaxpar.generate import GREEDY
from jaxpar.models.decoder import init_cache
from jaxpar.models.linear import matmul


def _reference(x, w, transposed):
    w = np.asarray(w, np.float32)
    return np.asarray(x, np.float32) @ (w.T if transposed else w)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("lead", [(1,), (1, 1), (3,), (2, 5)])
def test_half_matmul_accumulates_in_float32(lead, transposed):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((*lead, 96)).astype(ml_dtypes.bfloat16)
    w = rng.standard_normal((40, 96) if transposed else (96, 40)).astype(ml_dtypes.bfloat16)
    ref = _reference(x, w, transposed)
    y32 = np.asarray(matmul(jnp.asarray(x), jnp.asarray(w), out_dtype=jnp.float32, w_transposed=transposed))
    assert y32.shape == (*lead, 40)
    # float32 accumulation of exact bfloat16 products: float32 rounding only.
    np.testing.assert_allclose(y32, ref, rtol=1e-5, atol=1e-4)
    y16 = matmul(jnp.asarray(x), jnp.asarray(w), w_transposed=transposed)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y16), y32.astype(ml_dtypes.bfloat16))


@pytest.fixture(scope="module")
def stories16(stories_dir):
    return jaxpar.load(stories_dir, dtype="bfloat16", tokenizer=False, progress=False)


@pytest.mark.parametrize("batch", [1, 2])
def test_bf16_decode_makes_no_float32_copy_of_a_weight(stories16, batch):
    g = stories16._generator
    weights = g._flat_state()
    shapes = {tuple(w.shape) for w in weights if w.ndim == 2}
    assert {w.dtype for w in weights} == {jnp.dtype(jnp.bfloat16)}
    _, decode = g.programs(GREEDY)
    cache = init_cache(stories16.cfg, stories16.sharding, batch, 32, g.cache_dtype)
    hlo = decode.lower(weights, jnp.zeros((batch,), jnp.int32), cache).compile().as_text()
    entry = hlo[hlo.index("\nENTRY"):]  # buffers the step materialises (not values inside fusions)
    f32_2d = {tuple(int(d) for d in m.split(",")) for m in re.findall(r"= f32\[(\d+,\d+)\]", entry)}
    copies = {s for s in f32_2d if s in shapes or s[::-1] in shapes}
    assert not copies, f"the bf16 decode step materialises float32 weights of shapes {copies}"
