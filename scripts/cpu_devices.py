"""Shared by the benchmark scripts: N host CPU devices, set before JAX is imported."""

from __future__ import annotations

import os
import sys


def force_cpu_devices_from_argv(default: int) -> int:
    """Reads `--devices N` from argv (argparse runs later, after JAX is imported) and sets
    XLA_FLAGS for that many host-platform devices, CPU only. Returns N."""
    n = default
    for i, arg in enumerate(sys.argv):
        if arg == "--devices" and i + 1 < len(sys.argv):
            n = int(sys.argv[i + 1])
        elif arg.startswith("--devices="):
            n = int(arg.split("=", 1)[1])
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={n}")
    os.environ["XLA_FLAGS"] = " ".join(flags)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return n
