"""Pipeline parallelism (`pp` in the rule table): every partition and in-stage policy gives
the one-device greedy tokens and logits; a stage reads only its own tensors (safetensors,
GGUF, Orbax), measured by recording what the readers are asked for; invalid partitions are
clear errors; `jaxpar plan` reports the stages; two `jax.distributed` processes run one
stage each.

Compiling dominates the time here, so each pipeline is loaded once (module fixtures), runs
few decode steps, and only some pipelines chunk their prefill (extend programs)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxpar
from jaxpar.assembly import ReadStats, abstract_model, make_sharding, open_checkpoint, smollm2_gguf_path
from jaxpar.loading.gguf_source import GGUFSource
from jaxpar.loading.loader import layer_of
from jaxpar.loading.sources import SafetensorsSource
from jaxpar.pipeline import bubble_fraction
from jaxpar.sharding.inspect import plan
from jaxpar.sharding.model_sharding import PipelineSharding
from jaxpar.sharding.resolve import build_sharding
from jaxpar.sharding.rules import RuleTableError, parse_rule_table
from tests import hf_models

PROMPTS = ["Once upon a time", "The little dog"]  # 5 and 4 tokens: ragged chunks
NEW = 8
RTOL = 1e-5


def _pp(pp, tp=1, partition=None, rules=(), **axes):
    table = {"axes": {"pp": pp, "tp": tp, **axes}, "rules": list(rules)}
    if partition is not None:
        table["layer_partition"] = partition
    return table


def _close(got, ref):
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=RTOL * np.abs(ref).max())


@pytest.fixture(scope="module")
def one_device(stories_dir):
    model = jaxpar.load(stories_dir, progress=False)
    ids = np.array([model.encode(text)[:8] for text in ("Once upon a time there was a", "The little dog ran to the park")])
    return model.generate(PROMPTS, NEW).token_ids, ids, model.logits(ids)


DCP = [{"match": {"kind": "attention"}, "plan": {"tp_size": "attn_tp", "dcp_size": "dcp"}}]
# name: (policy, devices, prefill chunk). stories260K has 5 layers.
STORIES = {
    "pp2 2,3 x tp2 chunked": (_pp(2, tp=2, partition="2,3"), 8, 2),
    "pp4 1,1,1,2": (_pp(4, partition="1,1,1,2"), 8, None),
    "pp5 over 5 devices": ({"axes": {"pp": 5}}, 5, None),
    "pp2 x tpa1+dcp2 chunked": (_pp(2, tp=2, attn_tp=1, dcp=2, rules=DCP), 8, 4),
}


@pytest.mark.parametrize("name", list(STORIES))
def test_stories_pipeline_matches_one_device(name, stories_dir, one_device):
    policy, n, chunk = STORIES[name]
    tokens, ids, logits = one_device
    model = jaxpar.load(stories_dir, policy=policy, devices=jax.devices()[:n], progress=False,
                        prefill_chunk=chunk)
    sharding = model.sharding
    assert isinstance(sharding, PipelineSharding) and sharding.num_stages == policy["axes"]["pp"]
    assert sum(sharding.partition) == 5
    _close(model.logits(ids), logits)
    assert model.generate(PROMPTS, NEW).token_ids == tokens


def test_stage_devices_and_layers_follow_the_partition(stories_dir):
    cfg = open_checkpoint(stories_dir).cfg
    ps = make_sharding(cfg, _pp(2, tp=2, partition="2,3"))
    assert [list(r) for r in ps.ranges] == [[0, 1], [2, 3, 4]]
    assert [[d.id for d in m.devices.flat] for m in ps.meshes] == [[0, 1], [2, 3]]
    first, last = ps.stages
    assert (first.owned_layers, last.owned_layers) == ((0, 1), (2, 3, 4))
    assert first.embed is not None and first.head is None and last.embed is None and last.head is not None
    # As even as possible, the remainder on the first stages.
    assert make_sharding(cfg, _pp(3)).partition == (2, 2, 1)


# --------------------------------------------------------------------------- other families


def _tiny(tmp_path_factory, family: str) -> Path:
    if not hasattr(hf_models, "write_tiny"):  # until tiny checkpoints are written without torch
        pytest.importorskip("torch", reason="tiny Qwen3.5 / MoE checkpoints are written by torch here")
    return hf_models.save_tiny(family, tmp_path_factory.mktemp(family) / family)


RNG = np.random.default_rng(0)
TINY_PROMPTS = [RNG.integers(3, 256, size=n).tolist() for n in (7, 13, 3)]  # 3 rows: 2 micro-batches
TINY_IDS = RNG.integers(3, 256, size=(2, 11)).astype(np.int32)
EP = [{"match": {"kind": "moe"}, "plan": {"tp_size": "tp", "ep_size": "ep"}}]


@pytest.mark.parametrize("family,policy", [
    # Stage 0 holds only Gated DeltaNet layers; GDN split over the 2 devices of each stage.
    ("qwen3_5", _pp(2, tp=2, partition="2,2")),
    # Experts split over 2 devices inside each stage (pure EP).
    ("qwen3_moe", _pp(2, tp=2, ep=2, rules=EP)),
])
def test_hybrid_and_moe_pipelines_match_one_device(family, policy, tmp_path_factory):
    path = _tiny(tmp_path_factory, family)
    base = jaxpar.load(path, progress=False, tokenizer=False)
    # Qwen3.5's prompts flow in chunks (extend through GDN and attention, rows ending early).
    chunk = 4 if family == "qwen3_5" else None
    model = jaxpar.load(path, policy=policy, progress=False, tokenizer=False, prefill_chunk=chunk)
    stage0 = model.module.stages[0].layers[0]
    if family == "qwen3_5":  # 4 key heads over the stage's 2 devices
        shards = stage0.linear_attn.in_proj_q.weight[...].addressable_shards
        assert len(shards) == 2 and {s.data.shape[1] for s in shards} == {2}
    else:  # 8 experts over the stage's 2 devices
        shards = stage0.mlp.experts.gate_proj[...].addressable_shards
        assert len(shards) == 2 and {s.data.shape[0] for s in shards} == {4}
    _close(model.logits(TINY_IDS), base.logits(TINY_IDS))
    assert model.generate(TINY_PROMPTS, 5, ignore_eos=True).token_ids == \
        base.generate(TINY_PROMPTS, 5, ignore_eos=True).token_ids


# --------------------------------------------------------------------------- stage-local reads


def _record(monkeypatch, cls) -> list[str]:
    """Names of the tensors any `cls` reader is asked for (shape or data)."""
    seen: list[str] = []
    for method in ("shape", "read"):
        original = getattr(cls, method)

        def recording(self, name, *args, _original=original):
            seen.append(name)
            return _original(self, name, *args)
        monkeypatch.setattr(cls, method, recording)
    return seen


def _load_stage(ckpt, stage, dtype=jnp.float32):
    graphdef, state = abstract_model(ckpt.cfg, stage, dtype)
    stats = ReadStats()
    return ckpt.load_state(state, stage, dtype, stats=stats), stats


def _stage_of(name: str, cfg, ranges) -> int | None:
    layer = layer_of(cfg, name)
    return None if layer is None else next(s for s, r in enumerate(ranges) if layer in r)


@pytest.mark.parametrize("tp", [1, 2])
def test_each_stage_reads_only_its_own_tensors(stories_dir, monkeypatch, tp):
    seen = _record(monkeypatch, SafetensorsSource)
    ckpt = open_checkpoint(stories_dir)
    ps = make_sharding(ckpt.cfg, _pp(2, tp=tp, partition="2,3"))
    sizes = {n: int(np.prod(ckpt.tensors().shape(n))) * 4 for n in ckpt.tensors().names()}
    per_stage = []
    for s, stage in enumerate(ps.stages):
        seen.clear()
        _, stats = _load_stage(ckpt, stage)
        names = set(seen)
        assert {_stage_of(n, ckpt.cfg, ps.ranges) for n in names} == {s, None}
        ends = {n for n in names if layer_of(ckpt.cfg, n) is None}
        assert ends == ({"model.embed_tokens.weight"} if s == 0 else {"model.norm.weight", "lm_head.weight"})
        # Each of the stage's tensors read once in all (its devices' blocks, no overlap).
        assert stats.bytes == sum(sizes[n] for n in names)
        per_stage.append(names)
    # Between them the stages read every tensor, none twice.
    assert not per_stage[0] & per_stage[1] and per_stage[0] | per_stage[1] == set(sizes)


def test_tied_embeddings_copy_on_the_last_stage(request, monkeypatch):
    if not hasattr(hf_models, "write_tiny"):  # until tiny checkpoints are written without torch
        pytest.importorskip("torch", reason="the tiny checkpoints are written by torch here")
    path = request.getfixturevalue("tiny_models")["qwen2"]  # tied embeddings
    seen = _record(monkeypatch, SafetensorsSource)
    model = jaxpar.load(path, policy=_pp(2), progress=False, tokenizer=False)
    assert "model.embed_tokens.weight" in model.module.read[1].tensors
    assert not any(layer_of(model.cfg, n) in range(0, 2) for n in model.module.read[1].tensors)
    assert "lm_head.weight" not in seen
    last = model.module.stages[1]
    assert last.lm_head is None and last.embed_tokens is not None
    base = jaxpar.load(path, progress=False, tokenizer=False)
    _close(model.logits(TINY_IDS), base.logits(TINY_IDS))


def test_gguf_stage_reads_only_its_layers(monkeypatch):
    try:
        path = smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.fail(str(e))
    seen = _record(monkeypatch, GGUFSource)
    ckpt = open_checkpoint(path)
    ps = make_sharding(ckpt.cfg, _pp(8))  # 30 layers: stage 0 holds layers 0-3
    seen.clear()
    _, stats = _load_stage(ckpt, ps.stages[0])
    layers = {layer_of(ckpt.cfg, n) for n in seen}
    assert layers == {None, 0, 1, 2, 3}
    assert {n for n in seen if layer_of(ckpt.cfg, n) is None} == {"model.embed_tokens.weight"}
    assert stats.bytes > 0 and set(seen) == stats.tensors


def test_orbax_stage_restores_only_its_parameters(stories_dir, tmp_path, monkeypatch):
    from jaxpar.checkpoint.orbax_io import hf_to_orbax
    from jaxpar.loading.orbax_reader import flatten, orbax_module

    dst = hf_to_orbax(stories_dir, tmp_path / "orbax", progress=False, group_bytes=200_000)
    ocp = orbax_module()
    requested: list[str] = []
    original = ocp.Checkpointer.restore

    def restore(self, directory, *args, args_=None, **kwargs):
        item = kwargs.get("args", args[0] if args else None)
        tree = getattr(item, "item", None) or getattr(item, "restore_args", None) or item
        requested.extend(flatten(dict(tree)))
        return original(self, directory, *args, **kwargs)
    monkeypatch.setattr(ocp.Checkpointer, "restore", restore)
    ckpt, safet = open_checkpoint(dst), open_checkpoint(stories_dir)
    ps = make_sharding(ckpt.cfg, _pp(2, tp=2, partition="2,3"))
    for s, stage in enumerate(ps.stages):
        requested.clear()
        state, _ = _load_stage(ckpt, stage)
        layers = {int(k.split("/")[1]) for k in requested if k.startswith("layers/")}
        assert layers == set(ps.ranges[s])
        assert ("embed_tokens/weight" in requested) == (s == 0)
        assert ("lm_head/weight" in requested) == (s == 1)
        reference, _ = _load_stage(safet, stage)
        for (path, a), (_, b) in zip(nnx.to_flat_state(state), nnx.to_flat_state(reference)):
            assert a.get_value().sharding == b.get_value().sharding, path
            np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))


# --------------------------------------------------------------------------- errors


INVALID = {
    "partition sum": (_pp(2, partition="2,2"), "layer_partition 2,2 sums to 4 layers, but the llama model has 5 layers"),
    "empty stage": (_pp(2, partition=[5, 0]), "layer_partition 5,0: stage 1 has 0 layers; every pipeline stage needs at least 1"),
    "more stages than layers": (_pp(8), "axes: pp=8 stages for a model of 5 layers: stage(s) 5-7 would have 0 layers"),
    "pp not dividing devices": ({"axes": {"pp": 3}}, "axes: pp=3 (times dp=1) does not divide the 8 devices"),
    "too few devices": (_pp(4, tp=4), "needs pp * dp * tp = 4 * 1 * 4 = 16 devices, but only 8 are available"),
    "per-stage rule": (_pp(2, tp=2, rules=[{"match": {"kind": "mlp", "layers": "3-4"}, "plan": {"tp_size": 4}}]),
                       "at layer 3 (model.layers.3.mlp) (pipeline stage 1: layers 3-4): the plan's sizes multiply "
                       "to 4 devices (tp_size=4, dcp_size=1, dp_size=1), which does not divide the tp=2 devices "
                       "of its pipeline stage"),
    "bad partition text": (_pp(2, partition="2;3"), "layer_partition '2;3' is not a comma-separated list"),
}


@pytest.mark.parametrize("name", list(INVALID))
def test_invalid_pipelines_are_clear_errors(name, stories_dir):
    policy, message = INVALID[name]
    with pytest.raises(RuleTableError) as e:
        jaxpar.load(stories_dir, policy=policy, progress=False)
    assert message in str(e.value)


def test_whole_model_builders_refuse_a_pipeline_table(stories_dir, tmp_path):
    from jaxpar.checkpoint.atomic import ConversionError
    from jaxpar.checkpoint.orbax_io import hf_to_orbax

    cfg = open_checkpoint(stories_dir).cfg
    with pytest.raises(RuleTableError, match="has pp=2: resolve it with build_pipeline"):
        build_sharding(parse_rule_table(_pp(2)), cfg, jax.devices())
    with pytest.raises(ValueError, match="prefill_chunk sets how a prompt flows through pipeline stages"):
        jaxpar.load(stories_dir, progress=False, prefill_chunk=64)
    with pytest.raises(ConversionError, match="a pipeline policy"):
        hf_to_orbax(stories_dir, tmp_path / "out", policy=_pp(2), progress=False)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- plan


def test_plan_reports_stages_layers_bytes_and_activations(stories_dir):
    whole = plan(stories_dir, {"axes": {"tp": 1}}, batch=4, seq=512, dtype="float32", collectives=False,
                 devices=jax.devices()[:1])
    report = plan(stories_dir, _pp(4, tp=2, partition="2,1,1,1"), batch=4, seq=512, dtype="float32",
                  collectives=False)
    assert report.mesh == {"pp": 4, "dp": 1, "tp": 2}
    assert [st.layers for st in report.stages] == [[0, 1], [2, 2], [3, 3], [4, 4]]
    assert [st.devices for st in report.stages] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert sum(st.param_bytes for st in report.stages) == sum(p.bytes_total for p in whole.params)
    # Hidden states [4, 512, 64] float32 per prefill, [4, 64] per decode step; the last
    # stage sends 4 token ids back.
    assert [st.activation_bytes_prefill for st in report.stages] == [4 * 512 * 64 * 4] * 3 + [0]
    assert [st.activation_bytes_decode for st in report.stages] == [4 * 64 * 4] * 3 + [4 * 4]
    sc = report.schedule
    assert (sc["chunk"], sc["chunks"], sc["micro_batches"]) == (256, 2, 4)
    assert sc["bubble_fraction"] == pytest.approx(bubble_fraction(4, 8)) == pytest.approx(3 / 11)
    text = report.format()
    assert "pipeline: 4 stages" in text and "(stage 3)" in text


def test_cli_plan_prints_the_stages(stories_dir, tmp_path, capsys):
    from jaxpar.cli import main

    policy = tmp_path / "pp.yaml"
    policy.write_text("parallelism_rules:\n  axes: {pp: 2, tp: 2}\n  layer_partition: [2, 3]\n")
    assert main(["plan", str(stories_dir), "--policy", str(policy), "--no-collectives", "--seq", "64"]) == 0
    out = capsys.readouterr().out
    assert "pipeline: 2 stages" in out and "model.layers.2.mlp" in out and "(stage 1)" in out
    policy.write_text("parallelism_rules:\n  axes: {pp: 2, tp: 2}\n  layer_partition: [2, 2]\n")
    assert main(["plan", str(stories_dir), "--policy", str(policy), "--no-collectives"]) == 2
    assert "layer_partition 2,2 sums to 4 layers" in capsys.readouterr().err


# --------------------------------------------------------------------------- two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_one_stage_each(stories_dir, tmp_path, one_device):
    port, transfer = str(_free_port()), _free_port()
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    worker = Path(__file__).with_name("pipeline_worker.py")
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(repo), env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, str(worker), str(i), port, str(transfer), str(stories_dir),
                               str(outs[i])], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    results = [json.loads(o.read_text()) for o in outs]
    cfg = open_checkpoint(stories_dir).cfg
    for i, r in enumerate(results):
        assert r["processes"] == 2
        assert r["held"] == [i == 0, i == 1]
        layers = {layer_of(cfg, n) for n in r["tensors_read"]} - {None}
        assert layers == ({0, 1} if i == 0 else {2, 3, 4})
    tokens, _, _ = one_device
    assert results[0]["token_ids"] == results[1]["token_ids"] == tokens
