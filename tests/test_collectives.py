"""Collectives counted in the dtype the program moves (XLA:CPU promotes bf16 ones to f32)."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpar.config import config_from_hf_dict
from jaxpar.sharding.collectives import collective_ops, compiled_collectives, ring_steps, ring_wire_bytes
from jaxpar.sharding.inspect import plan_report
from jaxpar.sharding.resolve import build_sharding
from jaxpar.sharding.rules import preset


def _row_parallel(dtype):
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    x = jax.ShapeDtypeStruct((4, 64), dtype, sharding=NamedSharding(mesh, P(None, "tp")))
    w = jax.ShapeDtypeStruct((64, 32), dtype, sharding=NamedSharding(mesh, P("tp", None)))
    f = jax.jit(lambda x, w: x @ w, out_shardings=NamedSharding(mesh, P()))
    return compiled_collectives(f.lower(x, w), 2)


def test_bf16_row_parallel_matmul_moves_bf16():
    compiled, ops = _row_parallel(jnp.bfloat16)
    # y [4, 32] summed over the 2 devices holding halves of the contracted dim: one
    # all-reduce of 4 * 32 bf16 values = 256 bytes.
    assert [(o.kind, o.result_bytes, o.group, o.dtypes) for o in ops] == [("all-reduce", 4 * 32 * 2, 2, ("bf16",))]
    # XLA:CPU itself runs it in float32: what the compiled module alone would report.
    assert [o.result_bytes for o in collective_ops(compiled.as_text(), 2)] == [4 * 32 * 4]
    assert ops[0].compiled_bytes == 4 * 32 * 4


def test_f32_stays_f32():
    _, ops = _row_parallel(jnp.float32)
    assert [(o.result_bytes, o.dtypes) for o in ops] == [(4 * 32 * 4, ("f32",))]


def test_plan_counts_bf16_decode_all_reduces():
    e, layers, batch = 256, 2, 8
    cfg = config_from_hf_dict(dict(
        model_type="llama", vocab_size=512, hidden_size=e, intermediate_size=512, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=256,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False))
    sharding = build_sharding(preset("tp", 4), cfg, jax.devices()[:4])
    rep = plan_report(cfg, sharding, batch=batch, seq=16, dtype=jnp.bfloat16)
    ar = rep.decode_collectives["all-reduce"]
    # the vocab-parallel embedding + o_proj and down_proj of every layer: [B, E] bf16 each
    assert ar.count == 1 + 2 * layers
    assert ar.bytes == (1 + 2 * layers) * batch * e * 2


def test_ring_model():
    assert ring_wire_bytes("all-reduce", 800, 8) == 2 * 7 / 8 * 800
    assert ring_wire_bytes("all-gather", 800, 8) == 7 / 8 * 800
    assert ring_wire_bytes("reduce-scatter", 100, 8) == 700
    assert ring_wire_bytes("all-reduce", 800, 1) == 0
    assert ring_steps("all-reduce", 8) == 14 and ring_steps("all-gather", 4) == 3
