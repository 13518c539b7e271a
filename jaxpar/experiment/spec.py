"""The experiment spec: which models, rule tables, workloads and hardware to compare.

```yaml
name: qwen3-32b-attention-dp            # default: the file name
hardware: h200                          # preset (h100, h200, b200, tpu-v5e), YAML file or mapping
dtype: bfloat16                         # default: the checkpoint's dtype
models:
  - qwen3-32b                           # a shipped config (jaxpar/configs), HF folder or config.json
  - {name: small, config: path/config.json, overrides: {num_hidden_layers: 4}}
policies:
  - {name: tp1, table: tp, devices: 1}  # a preset needs `devices`
  - name: tp8-adp8                      # an inline rule table (devices = its tp * dp)
    table: {axes: {tp: 8}, rules: [{match: {kind: attention}, plan: {dp_size: 8, tp_size: 1}}]}
  - {name: pp4-tp2, table: tp, devices: 2, pipeline: {stages: 4, chunk: 4096}}
workloads:
  - {name: chat, batch_per_device: 64, prompt: 1024, output: 1024}   # or `batch` (all devices)
modes: [prefill, extend, decode]        # and / or train
extend_chunk: 256                       # new tokens of the extend step (after `prompt` cached)
memory_fraction: 0.9                    # share of HBM a policy may fill
train: {batch: 8, seq: 2048, remat: {mlp: true}, optimizer_sharding: zero1}
```
`pipeline` is modelled from per-stage compiles (each stage is the policy's table over
`devices` devices holding its share of the layers) until jaxpar runs pipelines itself.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import yaml

from jaxpar.experiment.hardware import HardwareProfile, load_profile

MODES = ("prefill", "extend", "decode", "train")
TOP_KEYS = ("name", "hardware", "dtype", "models", "policies", "workloads", "modes", "extend_chunk",
            "memory_fraction", "train")
DTYPES = ("bfloat16", "float16", "float32")


class SpecError(ValueError):
    """An experiment spec is malformed."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    ref: str  # shipped config name, folder or config.json path
    overrides: tuple[tuple[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    stages: int
    chunk: int | None = None  # prompt tokens per pipelined chunk (None: the whole prompt)
    layer_partition: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    name: str
    table: Any  # preset name, YAML path, or mapping (resolved per model)
    devices: int | None = None  # devices of one stage (the table's when None)
    pipeline: PipelineSpec | None = None


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
    name: str
    prompt: int
    output: int
    batch: int | None = None
    batch_per_device: int | None = None

    def rows(self, devices: int) -> int:
        return self.batch if self.batch is not None else self.batch_per_device * devices


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    batch: int = 8
    seq: int = 2048
    remat: tuple[tuple[str, bool], ...] = ()
    optimizer_sharding: str = "params"  # "params" (like the parameters) or "zero1"


@dataclasses.dataclass(frozen=True)
class ExperimentSpec:
    name: str
    hardware: HardwareProfile
    models: tuple[ModelSpec, ...]
    policies: tuple[PolicySpec, ...]
    workloads: tuple[WorkloadSpec, ...]
    modes: tuple[str, ...] = ("prefill", "extend", "decode")
    dtype: str | None = None
    extend_chunk: int = 256
    memory_fraction: float = 0.9
    train: TrainSpec = TrainSpec()
    base_dir: Path = Path(".")


def _int(raw: Any, where: str, minimum: int = 1) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < minimum:
        raise SpecError(f"{where} must be an integer >= {minimum}, got {raw!r}")
    return raw


def _keys(raw: Any, allowed: tuple[str, ...], where: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise SpecError(f"{where} must be a mapping, got {raw!r}")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown} (known: {', '.join(allowed)})")
    return raw


def _list(raw: Any, where: str) -> list:
    if not isinstance(raw, list) or not raw:
        raise SpecError(f"{where} must be a non-empty list, got {raw!r}")
    return raw


def _unique(items, what: str) -> None:
    names = [i.name for i in items]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SpecError(f"duplicate {what} name(s) {dup}: give each a distinct `name`")


def _model(raw: Any, i: int) -> ModelSpec:
    where = f"models[{i}]"
    if isinstance(raw, str):
        return ModelSpec(name=Path(raw).stem if raw.endswith(".json") else Path(raw).name, ref=raw)
    raw = _keys(raw, ("name", "config", "overrides"), where)
    if "config" not in raw:
        raise SpecError(f"{where}: needs `config` (a shipped config name, an HF folder or a config.json)")
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, Mapping):
        raise SpecError(f"{where}: overrides must be a mapping of HF config keys, got {overrides!r}")
    ref = str(raw["config"])
    return ModelSpec(name=str(raw.get("name") or Path(ref).stem), ref=ref,
                     overrides=tuple(sorted(overrides.items())))


def _pipeline(raw: Any, where: str) -> PipelineSpec:
    raw = _keys(raw, ("stages", "chunk", "layer_partition"), where)
    stages = _int(raw.get("stages"), f"{where}.stages", 2)
    chunk = raw.get("chunk")
    if chunk is not None:
        chunk = _int(chunk, f"{where}.chunk")
    part = raw.get("layer_partition")
    if part is not None:
        if isinstance(part, str):
            part = [p.strip() for p in part.split(",")]
        try:
            part = tuple(int(p) for p in part)
        except (TypeError, ValueError):
            raise SpecError(f"{where}.layer_partition must list layers per stage, got {raw['layer_partition']!r}")
        if len(part) != stages or min(part) < 1:
            raise SpecError(f"{where}.layer_partition {list(part)} must give >= 1 layer to each of the "
                            f"{stages} stages")
    return PipelineSpec(stages=stages, chunk=chunk, layer_partition=part)


def _policy(raw: Any, i: int) -> PolicySpec:
    where = f"policies[{i}]"
    raw = _keys(raw, ("name", "table", "devices", "pipeline"), where)
    if "table" not in raw:
        raise SpecError(f"{where}: needs `table` (a preset name, a rule-table YAML file or an inline table)")
    table = raw["table"]
    if not isinstance(table, (str, Mapping)):
        raise SpecError(f"{where}: table must be a preset name, a file path or a mapping, got {table!r}")
    devices = raw.get("devices")
    if devices is not None:
        devices = _int(devices, f"{where}.devices")
    if isinstance(table, str) and not table.endswith((".yaml", ".yml", ".json")) and devices is None:
        raise SpecError(f"{where}: the preset {table!r} needs `devices`")
    pipeline = _pipeline(raw["pipeline"], f"{where}.pipeline") if raw.get("pipeline") else None
    name = raw.get("name") or (table if isinstance(table, str) else f"policy{i}")
    return PolicySpec(name=str(name), table=table, devices=devices, pipeline=pipeline)


def _workload(raw: Any, i: int) -> WorkloadSpec:
    where = f"workloads[{i}]"
    raw = _keys(raw, ("name", "batch", "batch_per_device", "prompt", "output"), where)
    if ("batch" in raw) == ("batch_per_device" in raw):
        raise SpecError(f"{where}: give exactly one of `batch` (rows over all devices) and "
                        "`batch_per_device`")
    batch = _int(raw["batch"], f"{where}.batch") if "batch" in raw else None
    per = _int(raw["batch_per_device"], f"{where}.batch_per_device") if "batch_per_device" in raw else None
    prompt = _int(raw.get("prompt"), f"{where}.prompt")
    output = _int(raw.get("output"), f"{where}.output")
    name = raw.get("name") or f"b{batch or per}{'' if batch else 'pd'}-p{prompt}-o{output}"
    return WorkloadSpec(name=str(name), prompt=prompt, output=output, batch=batch, batch_per_device=per)


def _train(raw: Any) -> TrainSpec:
    raw = _keys(raw, ("batch", "seq", "remat", "optimizer_sharding"), "train")
    remat = raw.get("remat") or {}
    if not isinstance(remat, Mapping) or not all(isinstance(v, bool) for v in remat.values()):
        raise SpecError(f"train.remat must map block kinds to true/false, got {remat!r}")
    sharding = raw.get("optimizer_sharding", "params")
    if sharding not in ("params", "zero1"):
        raise SpecError(f"train.optimizer_sharding must be 'params' or 'zero1', got {sharding!r}")
    return TrainSpec(batch=_int(raw.get("batch", 8), "train.batch"), seq=_int(raw.get("seq", 2048), "train.seq"),
                     remat=tuple(sorted(remat.items())), optimizer_sharding=sharding)


def parse_spec(raw: Any, *, name: str = "experiment", base_dir: Path = Path(".")) -> ExperimentSpec:
    raw = _keys(raw, TOP_KEYS, "the experiment spec")
    for key in ("hardware", "models", "policies", "workloads"):
        if key not in raw:
            raise SpecError(f"the experiment spec needs `{key}`")
    try:
        hardware = load_profile(raw["hardware"], base_dir)
    except ValueError as e:
        raise SpecError(str(e)) from e
    models = tuple(_model(m, i) for i, m in enumerate(_list(raw["models"], "models")))
    policies = tuple(_policy(p, i) for i, p in enumerate(_list(raw["policies"], "policies")))
    workloads = tuple(_workload(w, i) for i, w in enumerate(_list(raw["workloads"], "workloads")))
    for items, what in ((models, "model"), (policies, "policy"), (workloads, "workload")):
        _unique(items, what)
    modes = tuple(raw.get("modes") or ("prefill", "extend", "decode"))
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SpecError(f"unknown mode(s) {bad} (modes: {', '.join(MODES)})")
    dtype = raw.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise SpecError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    fraction = raw.get("memory_fraction", 0.9)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise SpecError(f"memory_fraction must be in (0, 1], got {fraction!r}")
    return ExperimentSpec(
        name=str(raw.get("name") or name), hardware=hardware, models=models, policies=policies,
        workloads=workloads, modes=modes, dtype=dtype,
        extend_chunk=_int(raw.get("extend_chunk", 256), "extend_chunk"), memory_fraction=float(fraction),
        train=_train(raw.get("train") or {}), base_dir=base_dir)


def load_spec(path: str | Path) -> ExperimentSpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"experiment spec {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{path} is not valid YAML: {e}") from e
    return parse_spec(raw, name=path.stem, base_dir=path.resolve().parent)
