"""scripts/gpu_check.py --dry-run: every section runs at tiny shapes on the CPU (kernels
interpreted), so the one script meant for a GPU cannot rot between GPU runs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


def test_gpu_check_dry_run(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        out = tmp_path / "gpu_check.jsonl"
        assert module.main(["--dry-run", "--out", str(out)]) == 0
    finally:
        sys.modules.pop(spec.name, None)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    sections = {r["section"] for r in records}
    assert set(module.SECTIONS) | {"run", "summary"} <= sections
    kernels = [r for r in records if r["section"] == "kernels" and "op" in r]
    assert {r["op"] for r in kernels} == set(module.dispatch.OPS)
    # A kernel may reject a shape outside its rules (say so); every kernel that ran is right.
    ran = [r for r in kernels if "unsupported" not in r]
    assert {r["op"] for r in ran} == set(module.dispatch.OPS)
    assert all(r["ok"] and r["nans"] == 0 for r in ran), kernels
    decode = [r for r in records if r["section"] == "decode" and "kv_len" in r]
    assert all(r["reference_ms"] > 0 and r["floor_ms"] > 0 for r in decode)
    generate = [r for r in records if r["section"] == "generate"]
    assert any(r.get("decode_tokens_per_s") for r in generate) and all(r.get("ok") for r in generate
                                                                     if "batch" in r)
    assert records[-1]["failed"] == 0
