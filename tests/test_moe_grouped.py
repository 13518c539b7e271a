"""The grouped (sorted, capacity-free) MoE path: equal to the dense path on balanced and
skewed routing, for both grouped-matmul bodies and for a rank holding a slice of the experts;
and its compiled FLOPs (XLA's cost analysis, through scripts/bench_moe_flops.py) within 1.3x
of the sparse minimum where the dense path spends E/k times it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpar.config import config_from_hf_dict
from jaxpar.models.grouped_matmul import grouped_experts, sort_by_expert
from jaxpar.models.moe import _dense_local

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_moe_flops.py"
N, H, I, E, K = 24, 16, 8, 8, 3


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("bench_moe_flops", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(SCRIPT.parent))


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, H)).astype(np.float32)
    wg, wu = (rng.normal(size=(E, H, I)).astype(np.float32) for _ in range(2))
    wd = rng.normal(size=(E, I, H)).astype(np.float32)
    return rng, x, wg, wu, wd


def _routing(rng, skewed: bool):
    if skewed:  # every token picks experts 5, 6, 7: one rank's experts get all the rows
        top_i = np.tile(np.array([7, 5, 6], np.int32), (N, 1))
    else:
        top_i = np.argsort(-rng.normal(size=(N, E)), axis=1)[:, :K].astype(np.int32)
    return top_i, rng.random((N, K)).astype(np.float32)


_grouped = jax.jit(grouped_experts, static_argnames=("body",))
_dense = jax.jit(_dense_local)


@pytest.mark.parametrize("skewed", [False, True], ids=["balanced", "skewed"])
@pytest.mark.parametrize("body", ["tiled", "ragged"])
def test_grouped_equals_dense(body, skewed):
    rng, x, wg, wu, wd = _weights()
    top_i, top_w = _routing(rng, skewed)
    combine = np.zeros((N, E), np.float32)
    np.put_along_axis(combine, top_i, top_w, axis=1)
    # The whole expert set, and a rank holding experts [4, 8) (others' pairs give nothing).
    for lo, hi in ((0, E), (4, E)):
        want = np.asarray(_dense(x, combine[:, lo:hi], wg[lo:hi], wu[lo:hi], wd[lo:hi]))
        got = np.asarray(_grouped(x, top_i, top_w, wg[lo:hi], wu[lo:hi], wd[lo:hi], lo, body=body))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_sort_by_expert_counts_and_order():
    top_i = jnp.asarray([[3, 0], [1, 3], [2, 0]], jnp.int32)
    top_w = jnp.asarray([[0.5, 0.25], [1.0, 2.0], [4.0, 8.0]], jnp.float32)
    token, weight, sizes = sort_by_expert(top_i, top_w, 2, 2)  # this rank: experts 2, 3
    assert sizes.tolist() == [1, 2]
    # Rows: expert 2 (token 2), expert 3 (tokens 0, 1), then one row of another rank's pair.
    assert token.tolist()[:3] == [2, 0, 1] and weight.tolist()[:3] == [4.0, 0.5, 2.0]
    assert token.shape == (3 * 2,) and weight.tolist()[3:] == [0.0] * 3


def test_prefill_flops_near_sparse_minimum(bench):
    cfg = config_from_hf_dict({**bench.DEFAULT_BLOCK, "hidden_size": 64, "moe_intermediate_size": 32,
                               "num_experts": 32, "num_experts_per_tok": 4})
    rules = bench.block_rules(cfg, 1, 1)
    tokens = 128
    minimum = bench.minimum_flops(cfg, tokens, 1)
    grouped = bench.compiled_flops(cfg, rules, "grouped:tiled", tokens) / minimum
    dense = bench.compiled_flops(cfg, rules, "dense", tokens) / minimum
    assert grouped <= 1.3, grouped
    # The dense path computes every expert for every token: about E/k = 8 times the minimum.
    assert dense > 0.8 * cfg.num_experts / cfg.num_experts_per_tok, dense


def test_auto_choice(bench):
    """Decode gathers; prefill is grouped, except with the CPU's tiled body below TILED_MIN_ROWS
    rows per expert, where the dense path is faster; with ragged_dot (GPU/TPU) always grouped."""
    from flax import nnx

    from jaxpar.models.moe import TILED_MIN_ROWS, SparseMoE

    cfg = config_from_hf_dict(bench.DEFAULT_BLOCK)  # 128 experts, top-8
    rules = bench.block_rules(cfg, 1, 1)
    cpu = nnx.eval_shape(lambda: SparseMoE(cfg, jnp.float32, rules))
    ragged = nnx.eval_shape(lambda: SparseMoE(cfg, jnp.float32, rules, grouped_body="ragged"))
    threshold = TILED_MIN_ROWS * cfg.num_experts // cfg.num_experts_per_tok  # tokens
    assert [cpu.local_impl(n) for n in (1, 15, 16, threshold - 1, threshold)] == [
        "gather", "gather", "dense", "dense", "grouped"]
    assert [ragged.local_impl(n) for n in (15, 16, threshold)] == ["gather", "grouped", "grouped"]
