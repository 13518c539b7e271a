"""The log-sum-exp merge of decode context parallelism across ranks (models/kv_parallel.py):
equal to the single-shard merge of the kernels' reference, and guarded where ranks saw no
valid key (lse = -inf)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from jaxpar.kernels_pallas.attention import merge_attention_partials
from jaxpar.models.kv_parallel import merge_over_ranks

RANKS = 4


@pytest.fixture(scope="module")
def merge():
    mesh = Mesh(np.array(jax.devices()[:RANKS]), ("dcp",))
    # Per rank: o [1, B, H, D], lse [1, B, H]; the merged output is the same on every rank.
    return jax.jit(jax.shard_map(lambda o, lse: merge_over_ranks(o[0], lse[0], "dcp")[None], mesh=mesh,
                                 in_specs=(P("dcp"), P("dcp")), out_specs=P("dcp"), check_vma=False))


def test_merge_over_ranks_matches_the_reference_merge(merge):
    rng = np.random.default_rng(0)
    o = rng.normal(size=(RANKS, 3, 2, 8)).astype(np.float32)
    lse = rng.normal(size=(RANKS, 3, 2)).astype(np.float32) * 4
    lse[1, 0] = -np.inf  # a rank with no valid key for row 0
    lse[:, 1, 1] = -np.inf  # no rank has a valid key: a padding row
    o[1, 0] = 0.0
    o[:, 1, 1] = 0.0
    got = np.asarray(merge(jnp.asarray(o), jnp.asarray(lse)))
    want, _ = merge_attention_partials(jnp.asarray(o), jnp.asarray(lse))
    assert np.isfinite(got).all()
    for r in range(RANKS):
        np.testing.assert_allclose(got[r], np.asarray(want), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[0, 1, 1], 0.0)
