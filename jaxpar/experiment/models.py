"""Model configs for experiments: shipped `config.json`s, HF folders or bare config files,
with optional overrides (e.g. fewer layers) — never any weights."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

from jaxpar.config import ConfigError, ModelConfig, config_from_hf_dict, read_hf_config

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def shipped_configs() -> list[str]:
    """Names of the configs shipped under jaxpar/configs (e.g. "qwen3-32b")."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))


def read_config_dict(ref: str | Path, base: Path | None = None) -> dict[str, Any]:
    """The raw HF config dict of a shipped name, an HF folder, or a config.json file."""
    text = str(ref)
    if text in shipped_configs():
        return json.loads((CONFIGS_DIR / f"{text}.json").read_text())
    path = Path(text)
    if not path.is_absolute() and base is not None and (base / path).exists():
        path = base / path
    if path.is_dir():
        return read_hf_config(path)
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
    raise ConfigError(f"model {text!r} is neither a shipped config ({', '.join(shipped_configs())}), "
                      "an HF model folder nor a config.json file")


def apply_overrides(hf: dict[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """HF config keys replaced by `overrides` (for image-text configs, inside text_config).
    Fewer `num_hidden_layers` also cut a `layer_types` list to the first layers."""
    hf = copy.deepcopy(hf)
    if not overrides:
        return hf
    target = hf["text_config"] if isinstance(hf.get("text_config"), dict) else hf
    target.update(copy.deepcopy(dict(overrides)))
    n = target.get("num_hidden_layers")
    if isinstance(target.get("layer_types"), list) and "layer_types" not in overrides and n is not None:
        if n > len(target["layer_types"]):
            raise ConfigError(f"num_hidden_layers={n} exceeds the {len(target['layer_types'])} "
                              "layer_types of the config")
        target["layer_types"] = target["layer_types"][:n]
    return hf


def load_model_config(ref: str | Path, overrides: Mapping[str, Any] | None = None,
                      base: Path | None = None) -> ModelConfig:
    return config_from_hf_dict(apply_overrides(read_config_dict(ref, base), overrides))


def slice_layers(cfg: ModelConfig, start: int, stop: int) -> ModelConfig:
    """The same model with only layers [start, stop) (a pipeline stage; embedding and head
    stay, so callers subtract them where a stage does not hold them)."""
    if not 0 <= start < stop <= cfg.num_layers:
        raise ConfigError(f"layer slice [{start}, {stop}) is outside the {cfg.num_layers} layers")
    return dataclasses.replace(cfg, num_layers=stop - start, layer_types=cfg.layer_types[start:stop],
                               mlp_types=cfg.mlp_types[start:stop])


def even_partition(layers: int, stages: int) -> list[int]:
    """Layers per stage, as even as possible (earlier stages take the remainder)."""
    if stages < 1 or stages > layers:
        raise ConfigError(f"cannot split {layers} layers into {stages} pipeline stages")
    base, extra = divmod(layers, stages)
    return [base + (1 if s < extra else 0) for s in range(stages)]
