"""jaxpar.training: sharded gradients, fine-tuning stories260K, bit-identical resume."""

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpar.assembly import make_sharding
from jaxpar.config import config_from_hf_dict
from jaxpar.training import Batch, OptimizerConfig, Trainer, causal_lm_loss, init_params, train
from jaxpar.training.data import windows, TextDataset
from jaxpar.training.step import grads_fn, model_graph

# tests/data/tiny_stories_style.txt: twelve short stories in the style of TinyStories,
# written for this project (not taken from the data set).
TEXT = "tiny_stories_style.txt"

LLAMA = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
             num_attention_heads=8, num_key_value_heads=4, head_dim=8, max_position_embeddings=128,
             rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)
MOE = dict(LLAMA, model_type="qwen3_moe", moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
           norm_topk_prob=True)


def _batch(vocab, rows=8, t=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (rows, t + 1)).astype(np.int32)
    lengths = np.array([t + 1, 12, t + 1, 5, t + 1, t + 1, 9, t + 1][:rows], np.int32)  # some rows padded
    weights = (np.arange(t)[None] + 1 < lengths[:, None]).astype(np.float32)
    return Batch(inputs=tokens[:, :-1], targets=tokens[:, 1:], weights=weights, lengths=np.minimum(lengths, t))


@pytest.fixture(scope="module")
def one_device_grads():
    out = {}
    for name, hf in (("llama", LLAMA), ("moe", MOE)):
        cfg = config_from_hf_dict(hf)
        sharding = make_sharding(cfg, None)
        params = init_params(cfg, sharding, seed=0)
        batch = _batch(cfg.vocab_size)
        (loss, _), grads = jax.jit(functools.partial(grads_fn, model_graph(cfg, sharding, jnp.float32)))(params, batch)
        out[name] = (cfg, params, batch, float(loss), jax.tree.map(np.asarray, grads))
    return out


@pytest.mark.parametrize("model, policy, devices, remat", [
    ("llama", "tp", 8, ()),
    ("llama", "tpa-dcp", 8, ("attention",)),
    ("llama", "sp", 4, ("mlp",)),
    ("moe", "ep", 8, ("moe",)),
])
def test_sharded_grads_equal_one_device(one_device_grads, model, policy, devices, remat):
    cfg, params, batch, loss, grads = one_device_grads[model]
    sharding = make_sharding(cfg, policy, devices=jax.devices()[:devices])
    placed = init_params(cfg, sharding, seed=0)  # the same values, in this sharding
    step = jax.jit(functools.partial(grads_fn, model_graph(cfg, sharding, jnp.float32, remat=remat)))
    (sharded_loss, count), sharded = step(placed, batch)
    assert float(count) == float(batch.weights.sum())
    assert float(sharded_loss) == pytest.approx(loss, abs=1e-6)
    for (path, g), s in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(sharded)):
        np.testing.assert_allclose(np.asarray(s), g, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-3  # the check is not vacuous


def test_loss_masks_padding():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5)), jnp.float32)
    targets = jnp.array([[1, 2, 3], [4, 0, 0]])
    weights = jnp.array([[1, 1, 1], [1, 0, 0]], jnp.float32)
    loss, count = causal_lm_loss(logits, targets, weights)
    logp = jax.nn.log_softmax(logits)
    expected = -(logp[0, 0, 1] + logp[0, 1, 2] + logp[0, 2, 3] + logp[1, 0, 4]) / 4
    assert float(count) == 4 and float(loss) == pytest.approx(float(expected), rel=1e-6)
    changed = causal_lm_loss(logits.at[1, 1:].set(99.0), targets, weights)[0]  # padding logits ignored
    assert float(changed) == float(loss)


def test_windows_and_deterministic_batches():
    tokens, lengths = windows([[1, 5, 6, 7, 8, 2], [1, 9, 2]], seq=3)
    assert tokens.tolist() == [[1, 5, 6, 7], [7, 8, 2, 0], [1, 9, 2, 0]] and lengths.tolist() == [4, 3, 3]
    data = TextDataset(tokens, lengths, seed=3)
    b = data.batch(5, 2)
    assert np.array_equal(b.inputs, data.batch(5, 2).inputs)  # a step's batch depends on (seed, step) only
    row = next(i for i, r in enumerate(b.inputs.tolist()) if r[0] == 7 or r == [1, 9, 2])
    assert b.weights[row].tolist() == [1.0, 1.0, 0.0] and b.lengths[row] == 3


def test_zero1_shards_optimizer_state_over_dp_and_matches():
    cfg = config_from_hf_dict(LLAMA)
    table = {"axes": {"tp": 2, "dp": 2}}
    sharding = make_sharding(cfg, table, devices=jax.devices()[:4])
    params = init_params(cfg, sharding, seed=0)
    batch = _batch(cfg.vocab_size)
    results = []
    for zero1 in (False, True):
        trainer = Trainer(cfg, sharding, OptimizerConfig(learning_rate=1e-2, total_steps=2), zero1=zero1)
        state = trainer.init(jax.tree.map(jnp.copy, params))
        if zero1:
            mu = state.opt_state[1][0].mu  # clip, then adamw's scale_by_adam state
            spec = mu["layers"][0]["mlp"]["up_proj"]["weight"].get_value().sharding.spec
            assert "dp" in jax.tree.leaves(tuple(spec))
        state, m = trainer.step(state, batch)
        results.append((m["loss"], jax.tree.map(np.asarray, state.params)))
    assert results[0][0] == results[1][0]
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.fixture(scope="module")
def finetuned(stories_dir, tmp_path_factory):
    data = stories_dir.parent / TEXT
    out = tmp_path_factory.mktemp("train") / "run"
    opt = OptimizerConfig(learning_rate=3e-3, warmup_steps=3, total_steps=30, weight_decay=0.0)
    kw = dict(steps=30, batch=8, seq=64, optimizer=opt, policy={"axes": {"tp": 4}}, devices=jax.devices()[:4],
              save_every=10, max_to_keep=3)
    return train(stories_dir, data, out, **kw), kw, data


def test_finetuning_stories260k_lowers_the_loss(finetuned):
    result, _, _ = finetuned
    losses = result.losses
    assert len(losses) == 30 and result.resumed_from is None
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    lines = (result.out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 31))


def test_resume_continues_bit_identically(finetuned, stories_dir, tmp_path):
    result, kw, data = finetuned
    copy = tmp_path / "run"
    shutil.copytree(result.out, copy)
    shutil.rmtree(copy / "checkpoints" / "30")  # as if the run had stopped after step 20
    resumed = train(stories_dir, data, copy, **{**kw, "steps": 22})
    assert resumed.resumed_from == 20 and resumed.steps == 22
    for got, want in zip(resumed.metrics, result.metrics[20:22]):
        assert got["step"] == want["step"]
        assert got["loss"] == want["loss"] and got["grad_norm"] == want["grad_norm"]
    # other settings are refused rather than silently continuing another run
    with pytest.raises(ValueError, match="other settings"):
        train(stories_dir, data, copy, **{**kw, "steps": 23, "batch": 4})
