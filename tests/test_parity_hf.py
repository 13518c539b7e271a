"""jaxpar against Hugging Face transformers (PyTorch, CPU) on tiny random checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxpar
from jaxpar.models.decoder import init_cache
from tests import hf_models

FAMILIES = hf_models.TINY_FAMILIES


@pytest.fixture(scope="module")
def loaded(tiny_models):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = jaxpar.load(tiny_models[family], tokenizer=False, progress=False)
        return cache[family]
    return get


def _ids(seed, batch, length, vocab=256):
    return np.random.default_rng(seed).integers(3, vocab, size=(batch, length)).astype(np.int32)


@hf_models.needs_torch
@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_logits_match_hf(family, tiny_models, loaded):
    ids = _ids(0, 2, 11)
    ours = loaded(family).logits(ids)
    ref = hf_models.hf_logits(tiny_models[family], ids)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def _prefill_then_decode_logits(model, ids, prompt_len):
    """Prefill ids[:, :prompt_len] into a cache, then feed the rest one token at a time."""
    g = model._generator
    batch = ids.shape[0]

    @jax.jit
    def prefill(state, tokens, lengths, cache):
        m = nnx.merge(g.graphdef, state)
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return m(tokens, pos, cache, lengths, mode="prefill", last_only=True)

    @jax.jit
    def decode(state, tokens, cache):
        m = nnx.merge(g.graphdef, state)
        return m(tokens[:, None], cache.lengths[:, None], cache, jnp.ones_like(cache.lengths),
                 mode="decode", last_only=True)

    cache = init_cache(model.cfg, model.sharding, batch, 32, model.dtype)
    padded = np.zeros((batch, 16), np.int32)
    padded[:, :prompt_len] = ids[:, :prompt_len]
    logits, cache = prefill(g.state, padded, jnp.full((batch,), prompt_len, jnp.int32), cache)
    out = [np.asarray(logits)]
    for t in range(prompt_len, ids.shape[1]):
        logits, cache = decode(g.state, jnp.asarray(ids[:, t]), cache)
        out.append(np.asarray(logits))
    return np.stack(out, axis=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_then_decode_equals_full_forward(family, loaded):
    model = loaded(family)
    ids = _ids(1, 2, 13)
    full = model.logits(ids)
    stepped = _prefill_then_decode_logits(model, ids, prompt_len=5)  # 1 prefill + 8 decodes
    np.testing.assert_allclose(stepped, full[:, 4:], rtol=1e-5, atol=1e-5 * np.abs(full).max())


@hf_models.needs_torch
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_match_hf_generate(family, tiny_models, loaded):
    prompt = _ids(2, 1, 7)[0].tolist()
    ours = loaded(family).generate(prompt, 12, ignore_eos=True).token_ids[0]
    assert ours == hf_models.hf_greedy(tiny_models[family], prompt, 12)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_batched_prompts_of_different_lengths_equal_one_by_one(family, loaded):
    model = loaded(family)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 256, size=n).tolist() for n in (3, 17, 9)]
    batched = model.generate(prompts, 10, ignore_eos=True).token_ids
    single = [model.generate(p, 10, ignore_eos=True).token_ids[0] for p in prompts]
    assert batched == single
