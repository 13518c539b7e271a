"""Shared by the benchmark scripts: what ran, where, with which libraries — written into
every result JSON so a number can be traced back to its command and machine."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import sys
from pathlib import Path

PACKAGES = ("jax", "jaxlib", "flax", "numpy", "torch", "transformers", "triton", "optax", "orbax-checkpoint")


def versions(packages=PACKAGES) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def machine() -> dict:
    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()}
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        import jax

        info["jax_devices"] = [str(d) for d in jax.devices()]
        info["jax_backend"] = jax.default_backend()
    except Exception:  # noqa: BLE001 - the report must not fail for want of jax
        pass
    return info


def run_info() -> dict:
    """Command line, machine (cores, load average, devices) and library versions."""
    return {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
            "versions": versions()}


def write_json(path: str | Path, payload: dict) -> Path:
    """Writes `payload` with `run_info()` merged in (under "run"); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run": run_info(), **payload}, indent=1, default=str))
    return path
