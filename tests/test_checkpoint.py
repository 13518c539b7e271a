"""Orbax checkpoints: HF -> Orbax -> HF round trips, restoring onto other meshes and
policies, atomic conversion (exceptions, signals, SIGKILL), peak host memory, bad inputs."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

import jaxpar
from jaxpar.checkpoint import (ConversionError, DestinationExistsError, OrbaxCheckpoint,
                               format_report, hf_to_orbax, inspect_checkpoint, is_orbax_checkpoint,
                               orbax_to_hf)
from jaxpar.checkpoint import orbax_io
from jaxpar.cli import main as cli_main
from jaxpar.config import ConfigError
from jaxpar.loading.loader import IGNORED_SUFFIXES
from jaxpar.loading.sources import CheckpointError
from jaxpar.sharding.rules import RuleTableError
from tests import hf_models

# Dense families (conftest's tiny_models) and, where tests/hf_models has them, the hybrid
# ones (fused GDN projections read by region, expert stacks).
FAMILIES = hf_models.TINY_FAMILIES + tuple(getattr(hf_models, "HYBRID_FAMILIES", ()))
REPO = Path(__file__).resolve().parents[1]
TP8 = {"axes": {"tp": 8}}
TPA_DCP = {"axes": {"tp": 8, "attn_tp": 4, "dcp": 2},
           "rules": [{"match": {"kind": "attention"}, "plan": {"tp_size": "attn_tp", "dcp_size": "dcp"}}]}
IDS = np.random.default_rng(1).integers(3, 256, size=(2, 12)).astype(np.int32)
# Small groups, so that even the tiny models span several Orbax groups.
GROUP = 100_000


def _hf_tensors(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as h:
            for name in h.keys():
                if not name.endswith(IGNORED_SUFFIXES):
                    out[name] = h.get_tensor(name)
    return out


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".jaxpar-" in p.name)


def _save_policy(src: Path) -> dict:
    """tp=8, or the widest plain TP the family allows (a family whose heads 8 does not divide)."""
    cfg = jaxpar.api.open_config(src)
    for tp in (8, 4, 2, 1):
        try:
            jaxpar.api.make_sharding(cfg, {"axes": {"tp": tp}})
            return {"axes": {"tp": tp}}
        except RuleTableError:
            continue
    raise AssertionError("no plain TP policy fits")


class _Lazy(dict):
    """family -> folder, made on first use (a -k selection makes only what it needs)."""

    def __init__(self, make):
        super().__init__()
        self._make = make

    def __missing__(self, family):
        self[family] = self._make(family)
        return self[family]


@pytest.fixture(scope="module")
def sources(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_hybrid")
    return _Lazy(lambda f: tiny_models[f] if f in tiny_models else hf_models.save_tiny(f, root / f))


@pytest.fixture(scope="module")
def orbax_dirs(sources, tmp_path_factory):
    """Each tiny family converted under tp=8 on 8 CPU devices (tp=4 where 8 does not fit)."""
    root = tmp_path_factory.mktemp("orbax")
    return _Lazy(lambda f: hf_to_orbax(sources[f], root / f, policy=_save_policy(sources[f]),
                                       group_bytes=GROUP, progress=False))


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_orbax_hf_is_bit_identical(family, sources, orbax_dirs, tmp_path):
    src, orb = sources[family], orbax_dirs[family]
    assert is_orbax_checkpoint(orb) and not _leftovers(orb.parent)
    meta = json.loads((orb / orbax_io.MARKER).read_text())
    assert len(meta["groups"]) > 1 and meta["dtype"] == "float32"
    assert (orb / "config.json").read_bytes() == (src / "config.json").read_bytes()

    # Sharded export (index file) and single-file export hold the same tensors.
    sharded = orbax_to_hf(orb, tmp_path / "sharded", max_shard_size="150KB", progress=False)
    single = orbax_to_hf(orb, tmp_path / "single", progress=False)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert [p.name for p in single.glob("*.safetensors")] == ["model.safetensors"]

    # Tensors the config says not to load (vision tower, MTP head) are not stored.
    skipped = set(meta["skipped_tensors"])
    original = {k: v for k, v in _hf_tensors(src).items() if k not in skipped}
    for folder in (sharded, single):
        exported = _hf_tensors(folder)
        assert sorted(exported) == sorted(original)
        for name, a in original.items():
            b = exported[name]
            assert (a.dtype, a.shape) == (b.dtype, b.shape), name
            assert a.tobytes() == b.tobytes(), name
        assert (folder / "config.json").read_bytes() == (src / "config.json").read_bytes()
        assert (folder / "generation_config.json").is_file()

    # The checkpoint is also a TensorSource in HF names and layouts.
    ckpt = OrbaxCheckpoint(orb)
    name = next(n for n in sorted(original) if original[n].ndim == 2 and original[n].shape[0] >= 9)
    assert ckpt.shape(name) == original[name].shape
    np.testing.assert_array_equal(ckpt.read(name, (slice(2, 9), slice(None))), original[name][2:9])


@hf_models.needs_torch
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_loads_the_export(family, sources, orbax_dirs, tmp_path):
    """transformers loads the (sharded) export and gives exactly the original's logits."""
    sharded = orbax_to_hf(orbax_dirs[family], tmp_path / "sharded", max_shard_size="150KB", progress=False)
    ref = hf_models.hf_logits(sources[family], IDS)
    np.testing.assert_array_equal(hf_models.hf_logits(sharded, IDS), ref)


def test_checkpoint_is_a_tensor_source_for_the_generic_loader(sources, orbax_dirs):
    """Code that reads HF tensors by name (loader.load_params) can read an Orbax checkpoint."""
    from jaxpar.loading.loader import load_params
    from jaxpar.models.decoder import CausalLM

    family = "qwen3_next" if "qwen3_next" in FAMILIES else "llama"
    ckpt = OrbaxCheckpoint(orbax_dirs[family])
    sharding = jaxpar.api.make_sharding(ckpt.cfg, None)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(ckpt.cfg, jax.numpy.float32, sharding)))
    state = load_params(state, ckpt.cfg, ckpt, sharding, jax.numpy.float32)
    reference = jaxpar.load(sources[family], tokenizer=False, progress=False)
    theirs = _param_state(reference)
    for path, var in nnx.to_flat_state(state):
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(theirs[path].get_value()))


def _param_state(model):
    return {k: v for k, v in nnx.to_flat_state(nnx.state(model.module, nnx.Param))}


@pytest.mark.parametrize("family", FAMILIES)
def test_restore_onto_other_meshes_and_policies(family, sources, orbax_dirs):
    """Saved under tp=8; restored under TPA+DCP (8 devices) and on one device."""
    src, orb = sources[family], orbax_dirs[family]
    reference = jaxpar.load(src, tokenizer=False, progress=False)  # HF, one device
    ref_logits = reference.logits(IDS)
    if hf_models.HAS_TORCH:  # HF parity of every family is asserted in test_parity_hf / test_hybrid_models
        np.testing.assert_allclose(ref_logits, hf_models.hf_logits(src, IDS), rtol=1e-4,
                                   atol=1e-4 * np.abs(ref_logits).max())

    one = jaxpar.load(orb, tokenizer=False, progress=False)
    assert len(one.mesh.devices.flat) == 1
    np.testing.assert_array_equal(one.logits(IDS), ref_logits)

    policy = TPA_DCP
    if "linear_attention" in one.cfg.layer_types:  # tp=8 does not divide the tiny GDN's key heads
        policy = {**TPA_DCP, "rules": TPA_DCP["rules"] + [{"match": {"kind": "linear_attention"},
                                                          "plan": {"tp_size": 1}}]}
    try:
        restored = jaxpar.load(orb, policy=policy, tokenizer=False, progress=False)
    except RuleTableError as e:
        pytest.skip(f"the TPA+DCP table does not fit {family}: {e}")
    from_hf = jaxpar.load(src, policy=policy, tokenizer=False, progress=False)
    assert len(restored.mesh.devices.flat) == 8
    ours, theirs = _param_state(restored), _param_state(from_hf)
    assert sorted(ours) == sorted(theirs)
    for path, var in ours.items():
        a, b = var.get_value(), theirs[path].get_value()
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), path  # the target sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(restored.logits(IDS), ref_logits, rtol=1e-5,
                               atol=1e-5 * np.abs(ref_logits).max())


def test_restore_casts_dtype_and_bf16_round_trip(tiny_models, orbax_dirs, tmp_path):
    src = tiny_models["llama"]
    bf = jaxpar.load(orbax_dirs["llama"], dtype="bfloat16", policy=TP8, tokenizer=False, progress=False)
    bf_hf = jaxpar.load(src, dtype="bfloat16", tokenizer=False, progress=False)
    for path, var in _param_state(bf).items():
        assert var.get_value().dtype == jax.numpy.bfloat16
        np.testing.assert_array_equal(np.asarray(var.get_value()),
                                      np.asarray(_param_state(bf_hf)[path].get_value()))

    orb16 = hf_to_orbax(src, tmp_path / "orb16", dtype="bfloat16", progress=False)
    assert jaxpar.api.open_config(orb16).checkpoint_dtype == "bfloat16"
    hf16 = orbax_to_hf(orb16, tmp_path / "hf16", progress=False)
    cfg = json.loads((hf16 / "config.json").read_text())
    assert "bfloat16" in (cfg.get("dtype"), cfg.get("torch_dtype"))
    tensors = _hf_tensors(hf16)
    assert {str(t.dtype) for t in tensors.values()} == {"bfloat16"}
    ref = jaxpar.load(src, dtype="bfloat16", tokenizer=False, progress=False).logits(IDS)
    again = jaxpar.load(hf16, dtype="bfloat16", tokenizer=False, progress=False).logits(IDS)
    np.testing.assert_array_equal(again, ref)


def test_inspect_and_cli(tiny_models, orbax_dirs, tmp_path, capsys):
    orb = orbax_dirs["qwen3"]
    report = inspect_checkpoint(orb)
    cfg = jaxpar.api.open_config(orb)
    assert report["model_type"] == "qwen3" and report["dtype"] == "float32"
    assert report["num_elements"] == sum(math.prod(t["shape"]) for t in report["tensors"])
    assert report["bytes"] == 4 * report["num_elements"]
    row = {t["path"]: t for t in report["tensors"]}["layers/0/self_attn/q_proj/weight"]
    assert row["shape"] == [cfg.hidden_size, cfg.num_heads, cfg.head_dim]
    assert "layers/2/mlp/down_proj/weight" in format_report(report)

    assert cli_main(["convert", "inspect", str(orb), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_tensors"] == len(report["tensors"])
    dst = tmp_path / "cli"
    assert cli_main(["convert", "hf-to-orbax", str(tiny_models["qwen3"]), str(dst / "orb"),
                     "--policy", "tp", "--group-size", "200KB"]) == 0
    assert cli_main(["convert", "orbax-to-hf", str(dst / "orb"), str(dst / "hf"),
                     "--max-shard-size", "300KB"]) == 0
    assert sorted(_hf_tensors(dst / "hf")) == sorted(_hf_tensors(tiny_models["qwen3"]))
    # An existing destination is refused (exit 2, a message, nothing touched).
    capsys.readouterr()
    assert cli_main(["convert", "orbax-to-hf", str(dst / "orb"), str(dst / "hf")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["convert", "hf-to-orbax", str(tmp_path / "nope"), str(dst / "x")]) == 2
    assert "no such file" in capsys.readouterr().err


# --------------------------------------------------------------------------- atomicity


def test_failure_mid_conversion_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    calls = []
    real = orbax_io._save_group

    def failing(directory, tree, compress=False):
        calls.append(directory)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        real(directory, tree, compress)

    monkeypatch.setattr(orbax_io, "_save_group", failing)
    dst = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        hf_to_orbax(tiny_models["llama"], dst, group_bytes=GROUP, progress=False)
    assert not dst.exists() and _leftovers(tmp_path) == []

    # With --overwrite, a failed run leaves the previous destination intact.
    monkeypatch.setattr(orbax_io, "_save_group", real)
    hf_to_orbax(tiny_models["llama"], dst, group_bytes=GROUP, progress=False)
    before = (dst / orbax_io.MARKER).read_bytes()
    calls.clear()
    monkeypatch.setattr(orbax_io, "_save_group", failing)
    with pytest.raises(RuntimeError):
        hf_to_orbax(tiny_models["qwen3"], dst, overwrite=True, group_bytes=GROUP, progress=False)
    assert (dst / orbax_io.MARKER).read_bytes() == before and _leftovers(tmp_path) == []
    monkeypatch.setattr(orbax_io, "_save_group", real)
    hf_to_orbax(tiny_models["qwen3"], dst, overwrite=True, group_bytes=GROUP, progress=False)
    assert jaxpar.api.open_config(dst).model_type == "qwen3" and _leftovers(tmp_path) == []


_CHILD = """
import sys, time
from jaxpar.checkpoint import orbax_io
real = orbax_io._save_group
def slow(directory, tree, compress=False):
    real(directory, tree, compress)
    print("SAVED", flush=True)
    time.sleep(120)
orbax_io._save_group = slow
src, dst, how = sys.argv[1:4]
if how == "api":
    orbax_io.hf_to_orbax(src, dst, group_bytes=100000, progress=False)
else:
    from jaxpar.cli import main
    sys.exit(main(["convert", "hf-to-orbax", src, dst, "--group-size", "100000"]))
"""


def _child_env() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = ""
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _start_and_signal(src: Path, dst: Path, how: str, sig: int) -> int:
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(src), str(dst), how], cwd=REPO,
                            env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.strip() == "SAVED":
                break
        else:
            raise AssertionError(f"the child ended early: {proc.stderr.read()[-2000:]}")
        assert _leftovers(dst.parent), "the child should be writing into a temporary folder"
        proc.send_signal(sig)
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_killed_conversion_leaves_no_destination(tiny_models, tmp_path):
    src, dst = tiny_models["llama"], tmp_path / "out"
    assert _start_and_signal(src, dst, "api", signal.SIGKILL) == -signal.SIGKILL
    assert not dst.exists()
    stale = _leftovers(tmp_path)
    assert stale  # SIGKILL leaves the temporary folder ...
    hf_to_orbax(src, dst, group_bytes=GROUP, progress=False)
    assert _leftovers(tmp_path) == [] and is_orbax_checkpoint(dst)  # ... the next run removes it

    # SIGTERM through the CLI unwinds: no destination, no temporary folder, exit 130.
    dst2 = tmp_path / "out2"
    assert _start_and_signal(src, dst2, "cli", signal.SIGTERM) == 130
    assert not dst2.exists() and _leftovers(tmp_path) == []


# --------------------------------------------------------------------------- host memory


def _write_big_llama(path: Path, layers: int = 13, hidden: int = 512, ffn: int = 2048) -> int:
    """A random Llama folder of about 200 MB of float32 (written without torch)."""
    from safetensors.numpy import save_file

    heads, kv, vocab = 8, 4, 256
    d = hidden // heads
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "torch_dtype": "float32"}))
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                       p + "self_attn.q_proj.weight": (heads * d, hidden),
                       p + "self_attn.k_proj.weight": (kv * d, hidden),
                       p + "self_attn.v_proj.weight": (kv * d, hidden),
                       p + "self_attn.o_proj.weight": (hidden, heads * d),
                       p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
                       p + "mlp.down_proj.weight": (hidden, ffn)})
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return sum(t.nbytes for t in tensors.values())


_RSS_CHILD = """
import json, sys
import jax, jax.numpy as jnp
import orbax.checkpoint
from jaxpar.checkpoint import hf_to_orbax
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
jnp.zeros(4).block_until_ready()
baseline = status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
except OSError:
    pass
hf_to_orbax(sys.argv[1], sys.argv[2], group_bytes=int(sys.argv[3]), progress=False)
print(json.dumps({"baseline": baseline, "peak": status("VmHWM")}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc")
def test_conversion_peak_rss_is_below_model_size(tmp_path):
    model_bytes = _write_big_llama(tmp_path / "big")
    assert model_bytes > 190e6
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(tmp_path / "big"), str(tmp_path / "orb"),
                          str(8 * 2**20)], cwd=REPO, env=_child_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    increase = rss["peak"] - rss["baseline"]
    # Measured about 60 MB with 8 MiB groups; the whole model is about 200 MB.
    assert increase < 0.6 * model_bytes, (increase, model_bytes)
    assert inspect_checkpoint(tmp_path / "orb")["bytes"] == model_bytes


# --------------------------------------------------------------------------- bad inputs


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bad_sources_are_refused_cleanly(tiny_models, tmp_path):
    src = tiny_models["llama"]
    out = tmp_path / "out"

    with pytest.raises(ConversionError, match="no such file"):
        hf_to_orbax(tmp_path / "missing", out, progress=False)

    truncated = _copy(src, tmp_path / "truncated")
    st = truncated / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        hf_to_orbax(truncated, out, progress=False)

    missing_cfg = _copy(src, tmp_path / "nocfg")
    (missing_cfg / "config.json").unlink()
    with pytest.raises(ConversionError, match="config.json"):
        hf_to_orbax(missing_cfg, out, progress=False)

    wrong_shape = _copy(src, tmp_path / "shape")
    cfg = json.loads((wrong_shape / "config.json").read_text())
    (wrong_shape / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(ConversionError, match="mlp.*does not fit"):
        hf_to_orbax(wrong_shape, out, progress=False)

    from safetensors.numpy import save_file
    wrong_dtype = _copy(src, tmp_path / "dtype")
    tensors = _hf_tensors(wrong_dtype)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int32)
    save_file(tensors, str(wrong_dtype / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="dtype I32"):
        hf_to_orbax(wrong_dtype, out, progress=False)

    unsupported = _copy(src, tmp_path / "gpt2")
    (unsupported / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="not supported"):
        hf_to_orbax(unsupported, out, progress=False)

    assert not out.exists() and _leftovers(tmp_path) == []

    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(DestinationExistsError):
        hf_to_orbax(src, out, progress=False)
    assert (out / "keep").read_text() == "x"
    with pytest.raises(ConversionError, match="overlaps"):
        hf_to_orbax(src, src / "inside", progress=False)


_CORRUPT_CHILD = """
import sys
import jaxpar
from jaxpar.checkpoint import orbax_to_hf
from jaxpar.loading.sources import CheckpointError
for attempt in (lambda: jaxpar.load(sys.argv[1], tokenizer=False, progress=False),
                lambda: orbax_to_hf(sys.argv[1], sys.argv[2], progress=False)):
    try:
        attempt()
    except CheckpointError as e:
        assert "cannot" in str(e), e
    else:
        raise SystemExit("a corrupt checkpoint was accepted")
print("refused")
"""


def test_bad_orbax_checkpoints_are_refused(tiny_models, orbax_dirs, tmp_path):
    orb = orbax_dirs["llama"]

    no_group = _copy(orb, tmp_path / "nogroup")
    shutil.rmtree(no_group / "params" / "00001")
    with pytest.raises(CheckpointError, match="missing or incomplete"):
        jaxpar.load(no_group, tokenizer=False, progress=False)

    reshaped = _copy(orb, tmp_path / "reshaped")
    meta = json.loads((reshaped / orbax_io.MARKER).read_text())
    meta["model_config"]["intermediate_size"] = 96
    (reshaped / orbax_io.MARKER).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="shape"):
        jaxpar.load(reshaped, tokenizer=False, progress=False)

    # A ModelConfig written by a jaxpar with other fields: derived afresh from config.json.
    other_schema = _copy(orb, tmp_path / "schema")
    meta = json.loads((other_schema / orbax_io.MARKER).read_text())
    del meta["model_config"]["qk_norm"]
    meta["model_config"]["some_future_field"] = 1
    (other_schema / orbax_io.MARKER).write_text(json.dumps(meta))
    assert jaxpar.api.open_config(other_schema) == jaxpar.api.open_config(orb)

    retyped = _copy(orb, tmp_path / "retyped")
    meta = json.loads((retyped / orbax_io.MARKER).read_text())
    meta["params"][0]["dtype"] = "float16"
    (retyped / orbax_io.MARKER).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="Orbax holds float32"):
        inspect_checkpoint(retyped)
    with pytest.raises(CheckpointError, match="Orbax holds float32"):
        orbax_to_hf(retyped, tmp_path / "retyped_hf", progress=False)
    assert not (tmp_path / "retyped_hf").exists()

    # Corrupt data files. Orbax leaves its failed read coroutines to the garbage collector,
    # which prints them at exit, so this part runs in a child process.
    corrupt = _copy(orb, tmp_path / "corrupt")
    for f in (corrupt / "params").rglob("d/*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(f.read_bytes()[:100])
    out = subprocess.run([sys.executable, "-c", _CORRUPT_CHILD, str(corrupt), str(tmp_path / "corrupt_hf")],
                         cwd=REPO, env=_child_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split()[-1] == "refused", out.stderr[-3000:]
    assert not (tmp_path / "corrupt_hf").exists() and _leftovers(tmp_path) == []

    broken_marker = _copy(orb, tmp_path / "marker")
    (broken_marker / orbax_io.MARKER).write_text('{"format": "jaxpar-orbax", "vers')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        jaxpar.load(broken_marker, tokenizer=False, progress=False)

    with pytest.raises(CheckpointError, match="not a jaxpar Orbax checkpoint"):
        inspect_checkpoint(tiny_models["llama"])
    with pytest.raises(ConversionError, match="already a jaxpar Orbax"):
        hf_to_orbax(orb, tmp_path / "again", progress=False)


# --------------------------------------------------------------------------- inverse layouts


class _DictSource:
    def __init__(self, tensors):
        self.tensors = tensors

    def names(self):
        return list(self.tensors)

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def read(self, name, index):
        return self.tensors[name][index]


class _Reversed:
    """A layout the inverse has no special case for: ours = hf[::-1] (rows reversed)."""

    def names(self, base, available):
        return [base]

    def read(self, source, base, our_shape, index):
        return source.read(base, tuple(slice(None) for _ in our_shape))[::-1][index]


def test_assembler_inverts_fused_regions_expert_stacks_and_other_layouts():
    from jaxpar.checkpoint.inverse import Assembler
    from jaxpar.loading.layouts import ExpertStack, HFLayout

    rng = np.random.default_rng(0)
    hf = {"m.in_proj_qkv.weight": rng.standard_normal((24, 8), dtype=np.float32),  # q | k | v rows
          "m.conv1d.weight": rng.standard_normal((24, 1, 4), dtype=np.float32),
          "m.experts.gate_up_proj": rng.standard_normal((3, 10, 8), dtype=np.float32),  # fused [E, 2I, H]
          **{f"n.experts.{e}.down_proj.weight": rng.standard_normal((8, 5), dtype=np.float32) for e in range(3)},
          "m.odd.weight": rng.standard_normal((6, 2), dtype=np.float32)}
    params = [  # (base, layout, our shape)
        *[(f"m.{p}.weight", HFLayout(perm=(1, 0), name="../in_proj_qkv.weight", region=(0, 8 * i, 8 * i + 8)),
           (8, 2, 4)) for i, p in enumerate("qkv")],
        *[(f"m.conv_{p}", HFLayout(name="conv1d.weight", region=(0, 8 * i, 8 * i + 8)), (8, 4))
          for i, p in enumerate("qkv")],
        *[(f"m.experts.{kind}_proj", ExpertStack(per_expert=f"{{e}}.{kind}_proj.weight", per_layout=HFLayout(perm=(1, 0)),
                                                  fused="gate_up_proj",
                                                  fused_layout=HFLayout(perm=(0, 2, 1), region=(1, 5 * i, 5 * i + 5))),
           (3, 8, 5)) for i, kind in enumerate(("gate", "up"))],
        ("n.experts.down_proj", ExpertStack(per_expert="{e}.down_proj.weight", per_layout=HFLayout(perm=(1, 0)),
                                            fused="down_proj", fused_layout=HFLayout(perm=(0, 2, 1))), (3, 5, 8)),
        ("m.odd.weight", _Reversed(), (6, 2)),
    ]
    source = _DictSource(hf)
    assembler = Assembler({k: v.shape for k, v in hf.items()}, np.float32)
    for base, layout, shape in params:
        ours = layout.read(source, base, shape, tuple(slice(None) for _ in shape))
        assert ours.shape == shape
        assembler.add(base, layout, np.ascontiguousarray(ours))
    for name, tensor in hf.items():
        np.testing.assert_array_equal(assembler.pop(name), tensor)

    partial = Assembler({"m.in_proj_qkv.weight": (24, 8)}, np.float32)
    base, layout, shape = params[0]
    partial.add(base, layout, layout.read(source, base, shape, (slice(None),) * 3))
    with pytest.raises(ConversionError, match="not held by any parameter"):
        partial.pop("m.in_proj_qkv.weight")
