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


def xla_cpu_threads() -> int:
    """Threads XLA's CPU backend computes with: one per core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def match_torch_threads(threads: int | None = None) -> int:
    """Gives PyTorch (the HF reference) as many intra-op threads as XLA uses, or `threads`;
    returns the number. Every benchmark comparing the two calls this first."""
    import torch

    n = threads or xla_cpu_threads()
    torch.set_num_threads(n)
    return n


def run_info() -> dict:
    """Command line, machine (cores, load average, devices), threads and library versions."""
    threads = {"xla_cpu": xla_cpu_threads()}
    if "torch" in sys.modules:
        threads["torch"] = sys.modules["torch"].get_num_threads()
    return {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
            "threads": threads, "versions": versions()}


def write_json(path: str | Path, payload: dict) -> Path:
    """Writes `payload` with `run_info()` merged in (under "run"); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run": run_info(), **payload}, indent=1, default=str))
    return path
