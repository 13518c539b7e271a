"""Errors a user can run into (type + message), and the sampling options' behaviour."""

from __future__ import annotations

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpar
from jaxpar.config import ConfigError, supported_model_types
from jaxpar.loading.sources import CheckpointError
from jaxpar.models.decoder import init_cache
from jaxpar.sampling import SamplingParams, sample

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def stories(stories_dir):
    return jaxpar.load(stories_dir, progress=False)


@pytest.fixture(scope="module")
def tiny(tiny_models):
    """Tiny llama without a tokenizer; context 256."""
    return jaxpar.load(tiny_models["llama"], tokenizer=False, progress=False)


def _folder(tmp_path, src, name, *, config=True, weights=True):
    dst = tmp_path / name
    dst.mkdir()
    if config:
        shutil.copy(src / "config.json", dst / "config.json")
    if weights:
        shutil.copy(src / "model.safetensors", dst / "model.safetensors")
    return dst


# --------------------------------------------------------------------------- model folders


def test_unknown_model_type_lists_supported(tiny_models, tmp_path):
    folder = _folder(tmp_path, tiny_models["llama"], "gpt2")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported") as e:
        jaxpar.load(folder, progress=False)
    assert ", ".join(supported_model_types()) in str(e.value)
    assert "llama" in str(e.value) and "qwen3" in str(e.value)


def test_missing_config(tiny_models, tmp_path):
    folder = _folder(tmp_path, tiny_models["llama"], "noconfig", config=False)
    with pytest.raises(ConfigError, match="no config.json in"):
        jaxpar.load(folder, progress=False)


def test_invalid_json_config(tiny_models, tmp_path):
    folder = _folder(tmp_path, tiny_models["llama"], "badjson")
    (folder / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        jaxpar.load(folder, progress=False)


def test_missing_weights(tiny_models, tmp_path):
    folder = _folder(tmp_path, tiny_models["llama"], "noweights", weights=False)
    with pytest.raises(CheckpointError, match="no weights in .*expected model.safetensors"):
        jaxpar.load(folder, tokenizer=False, progress=False)


def test_unknown_alias_or_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a model folder, a .gguf file, nor an alias"
                                                r" \(smollm2-135m\)"):
        jaxpar.load("no-such-model", progress=False)
    with pytest.raises(FileNotFoundError, match="neither a model folder"):
        jaxpar.load(tmp_path / "missing", progress=False)


def test_unknown_dtype(tiny_models):
    with pytest.raises(ValueError, match=r"dtype 'float8' is not supported; choose one of "
                                         r"\['bfloat16', 'float16', 'float32'\] or 'auto'"):
        jaxpar.load(tiny_models["llama"], dtype="float8", tokenizer=False, progress=False)


# --------------------------------------------------------------------------- generate arguments


def test_prompt_longer_than_context(tiny):
    assert tiny.cfg.max_position_embeddings == 256
    with pytest.raises(ValueError, match="prompt 0 has 300 tokens, longer than the model's context of 256"):
        tiny.generate([5] * 300, 1)


def test_prompt_plus_new_tokens_beyond_context(tiny):
    with pytest.raises(ValueError, match=r"prompt 1 \(250 tokens\) \+ max_new_tokens \(7\) exceeds "
                                         "the model's context of 256"):
        tiny.generate([[5] * 10, [5] * 250], 7)
    assert len(tiny.generate([5] * 250, 6, ignore_eos=True).token_ids[0]) == 6  # the edge fits


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(temperature=float("nan")), "temperature must be >= 0"),
    (dict(top_k=-1), "top_k must be a whole number >= 0"),
    (dict(top_k=2.5), "top_k must be a whole number >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(seed=0.5), "seed must be a whole number"),
])
def test_invalid_sampling_options(tiny, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        tiny.generate([5, 6, 7], 4, **kwargs)


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_invalid_max_new_tokens(tiny, n):
    with pytest.raises(ValueError, match="max_new_tokens must be a whole number >= 1"):
        tiny.generate([5, 6, 7], n)


def test_empty_prompts(stories, tiny):
    with pytest.raises(ValueError, match="the prompt is empty"):
        stories.generate("", 4)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        tiny.generate([[5, 6], []], 4)
    with pytest.raises(ValueError, match="no prompts given"):
        tiny.generate([], 4)


def test_token_ids_outside_vocabulary(tiny):
    with pytest.raises(ValueError, match=r"prompt 0 has token id\(s\) \[256, -1\] outside the vocabulary"):
        tiny.generate([5, 256, -1], 4)


def test_text_prompt_without_tokenizer(tiny):
    with pytest.raises(ValueError, match="loaded without a tokenizer: pass token ids"):
        tiny.generate("hello", 4)


def test_chat_without_template(stories):
    assert not getattr(stories.tokenizer, "chat_template", None)
    with pytest.raises(ValueError, match="chat=True, but this model's tokenizer has no chat template"):
        stories.generate(PROMPT, 4, chat=True)


# --------------------------------------------------------------------------- sampling


def test_sampling_is_reproducible_per_seed_and_varies_across_seeds(stories):
    kw = dict(temperature=1.0, ignore_eos=True)
    a = stories.generate(PROMPT, 24, seed=7, **kw).token_ids[0]
    assert stories.generate(PROMPT, 24, seed=7, **kw).token_ids[0] == a
    others = {tuple(stories.generate(PROMPT, 24, seed=s, **kw).token_ids[0]) for s in (8, 9, 10)}
    assert others - {tuple(a)}
    greedy = stories.generate(PROMPT, 24, ignore_eos=True).token_ids[0]
    assert others | {tuple(a)} != {tuple(greedy)}


def test_batched_sampling_rows_differ(stories):
    rows = stories.generate([PROMPT] * 4, 24, temperature=1.0, seed=1, ignore_eos=True).token_ids
    assert len({tuple(r) for r in rows}) > 1  # each row draws its own tokens


def test_top_k_1_and_tiny_top_p_are_greedy(stories):
    greedy = stories.generate(PROMPT, 30).token_ids[0]
    assert stories.generate(PROMPT, 30, temperature=1.5, top_k=1, seed=3).token_ids[0] == greedy
    assert stories.generate(PROMPT, 30, temperature=1.5, top_p=1e-6, seed=3).token_ids[0] == greedy


def _step_logits(model, prompt_ids, generated):
    """Logits that chose each generated token: [len(generated), V]."""
    ids = prompt_ids + generated[:-1]
    return model.logits([ids])[0, len(prompt_ids) - 1:]


def test_sampled_tokens_lie_in_the_top_k_set(stories):
    prompt_ids = stories.encode(PROMPT)
    out = stories.generate(prompt_ids, 32, temperature=3.0, top_k=4, seed=11, ignore_eos=True).token_ids[0]
    logits = _step_logits(stories, prompt_ids, out)
    top4 = np.argsort(-logits, axis=-1)[:, :4]
    assert all(tok in top4[i] for i, tok in enumerate(out))
    # A high temperature does not just pick the argmax.
    assert sum(tok != top4[i, 0] for i, tok in enumerate(out)) >= 3


def test_sampled_tokens_lie_in_the_nucleus(stories):
    prompt_ids = stories.encode(PROMPT)
    out = stories.generate(prompt_ids, 32, temperature=1.0, top_p=0.6, seed=5, ignore_eos=True).token_ids[0]
    logits = _step_logits(stories, prompt_ids, out).astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for i, tok in enumerate(out):
        mass_before = probs[i][probs[i] > probs[i, tok]].sum()
        assert mass_before < 0.6 + 1e-4, (i, tok, mass_before)


@pytest.mark.parametrize("static", [True, False])
def test_sample_function_respects_top_k_and_top_p(static):
    """`sample` specialised statically (mode given) and decided at run time (lax.cond)."""
    logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.05, 0.05]] * 2, jnp.float32))
    keys = jax.random.split(jax.random.key(0), 300)

    @functools.partial(jax.jit, static_argnames=("greedy", "filtered"))
    def run(t, k, p, greedy=None, filtered=None):
        return jax.vmap(lambda key: sample(logits, key, t, k, p, greedy=greedy, filtered=filtered))(keys)

    def draws(params: SamplingParams):
        mode = dict(greedy=params.greedy, filtered=params.filtered) if static else {}
        return set(np.asarray(run(*params.arrays(), **mode)).ravel().tolist())

    assert draws(SamplingParams(temperature=1.0, top_k=2)) == {0, 1}
    assert draws(SamplingParams(temperature=1.0, top_p=0.65)) == {0, 1}  # 0.4 < 0.65 <= 0.7
    assert draws(SamplingParams(temperature=1.0, top_p=0.75)) == {0, 1, 2}
    assert draws(SamplingParams(temperature=1.0)) == {0, 1, 2, 3, 4}
    assert draws(SamplingParams(temperature=0.0, top_k=3)) == {0}
    assert draws(SamplingParams()) == {0}


# --------------------------------------------------------------------------- decode programs


def test_output_logits_are_the_logits_each_token_was_chosen_from(stories):
    prompt_ids = stories.encode(PROMPT)
    plain = stories.generate([prompt_ids, prompt_ids[:5]], 12, ignore_eos=True)
    out = stories.generate([prompt_ids, prompt_ids[:5]], 12, ignore_eos=True, output_logits=True)
    assert plain.logits is None
    assert out.token_ids == plain.token_ids  # the logits path picks the same greedy tokens
    for prompt, generated, logits in zip([prompt_ids, prompt_ids[:5]], out.token_ids, out.logits):
        assert logits.shape == (12, stories.cfg.vocab_size) and logits.dtype == np.float32
        assert np.argmax(logits, axis=-1).tolist() == generated
    ref = _step_logits(stories, prompt_ids, out.token_ids[0])  # teacher-forced full forward
    np.testing.assert_allclose(out.logits[0], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    kw = dict(temperature=1.0, top_k=8, seed=4, ignore_eos=True)
    sampled = stories.generate(prompt_ids, 12, output_logits=True, **kw)
    assert sampled.token_ids == stories.generate(prompt_ids, 12, **kw).token_ids
    assert sampled.logits[0].shape == (12, stories.cfg.vocab_size)


def test_decode_step_is_one_program_returning_tokens_only(stories):
    """Sampling runs inside the decode program (its key derived on device from [seed,
    step], which the program advances), and the logits stay on the device unless asked."""
    g = stories._generator
    vocab = stories.cfg.vocab_size
    for mode in [(True, False), (False, False)]:
        for with_logits in (False, True):
            _, decode = g.programs(mode, with_logits)
            cache = init_cache(stories.cfg, stories.sharding, 2, 32, g.cache_dtype)
            extra = [] if mode[0] else [jnp.array([1, 5], jnp.int32), *SamplingParams(temperature=1.0).arrays()]
            out = decode.lower(g._flat_state(), jnp.zeros((2,), jnp.int32), cache, *extra).out_info
            vocab_sized = [a for a in jax.tree.leaves(out) if vocab in a.shape]
            assert len(vocab_sized) == int(with_logits), (mode, with_logits)
            if not mode[0]:
                tokens, _, rng = out[:3]
                assert tokens.shape == (2,) and rng.shape == (2,)
    _, decode = g.programs((False, False))
    cache = init_cache(stories.cfg, stories.sharding, 1, 32, g.cache_dtype)
    tokens, cache, rng = decode(g._flat_state(), jnp.zeros((1,), jnp.int32), cache,
                                jnp.array([1, 5], jnp.int32), *SamplingParams(temperature=1.0).arrays())
    assert np.asarray(rng).tolist() == [1, 6]
