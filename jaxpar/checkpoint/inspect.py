"""`jaxpar convert inspect DIR`: what an Orbax checkpoint holds (read from Orbax's own
metadata, checked against the manifest): tensors, shapes, dtypes, bytes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from jaxpar.checkpoint.orbax_io import PARAMS_DIR, OrbaxCheckpoint


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    ckpt = OrbaxCheckpoint(path)
    tensors = []
    for g in range(len(ckpt.groups)):
        ckpt.verify_group(g)  # Orbax metadata == manifest, or a CheckpointError
        stored = ckpt.group_metadata(g)
        for e in ckpt.group_entries(g):
            shape, dtype = stored[e.path]
            tensors.append({"path": e.path, "shape": list(shape), "dtype": dtype,
                            "bytes": math.prod(shape) * np.dtype(dtype).itemsize,
                            "group": g, "hf_names": list(e.hf_names)})
    cfg = ckpt.cfg
    return {
        "path": str(ckpt.path),
        "model_type": cfg.model_type,
        "num_layers": cfg.num_layers,
        "dtype": ckpt.stored_dtype,
        "source": ckpt.meta.get("source"),
        "jaxpar_version": ckpt.meta.get("jaxpar_version"),
        "tensors": tensors,
        "num_tensors": len(tensors),
        "num_elements": sum(math.prod(t["shape"]) for t in tensors),
        "bytes": sum(t["bytes"] for t in tensors),
        "disk_bytes": _disk_bytes(ckpt.path / PARAMS_DIR),
        "groups": len(ckpt.groups),
        "tokenizer_files": ckpt.tokenizer_files,
        "skipped_tensors": list(ckpt.meta.get("skipped_tensors", [])),
    }


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_report(report: dict[str, Any]) -> str:
    rows = report["tensors"]
    width = max([len("parameter")] + [len(r["path"]) for r in rows])
    lines = [f"{report['path']}: {report['model_type']}, {report['num_layers']} layers, "
             f"{report['dtype']}, {report['num_tensors']} tensors in {report['groups']} Orbax group(s)",
             "",
             f"{'parameter':{width}s}  {'shape':>20s}  {'dtype':8s}  {'bytes':>14s}  group"]
    for r in rows:
        lines.append(f"{r['path']:{width}s}  {str(tuple(r['shape'])):>20s}  {r['dtype']:8s}  "
                     f"{r['bytes']:>14,d}  {r['group']:>5d}")
    lines += ["",
              f"total: {report['num_elements']:,d} elements, {report['bytes']:,d} bytes "
              f"({_human(report['bytes'])}); on disk {report['disk_bytes']:,d} bytes "
              f"({_human(report['disk_bytes'])})",
              f"tokenizer files: {', '.join(report['tokenizer_files']) or 'none'}"]
    return "\n".join(lines)
