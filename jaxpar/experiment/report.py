"""Experiment output: results.json, a Markdown table (results.md) and PNG plots."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from jaxpar.experiment.roofline import FORMULA


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f}"


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:,.2f}"


def _label(row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The policy, qualified by model / workload only where the results have several."""
    parts = []
    if len({r["model"] for r in rows}) > 1:
        parts.append(row["model"])
    parts.append(row["policy"])
    if len({r["workload"] for r in rows}) > 1:
        parts.append(row["workload"])
    return " / ".join(parts)


def _comm_ratio(row: dict[str, Any], mode: str) -> str:
    for stage in row.get("stage_details", []):
        d = stage["modes"].get(mode)
        if d is None:
            continue
        if d["analytic_min_wire_bytes"] == 0:
            return "-" if d["collective_wire_bytes"] == 0 else "inf"
        return f"{d['collective_wire_bytes'] / d['analytic_min_wire_bytes']:.2f}"
    return "-"


def _bounds(row: dict[str, Any]) -> str:
    stage = row["stage_details"][0]
    return "/".join(stage["modes"][m]["roofline"]["bound"] for m in ("prefill", "decode") if m in stage["modes"])


def markdown(results: dict[str, Any]) -> str:
    rows = results["rows"]
    hw = results["hardware"]
    lines = [f"# Experiment {results['spec']} on {hw['name']}", "",
             f"Per device: {hw['hbm_bytes'] / 1e9:.0f} GB HBM at {hw['hbm_bandwidth'] / 1e12:.2f} TB/s, "
             f"interconnect {hw['interconnect_bandwidth'] / 1e9:.0f} GB/s per direction; a policy fits when "
             f"parameters + cache + XLA:CPU temporaries <= {results['memory_fraction']:.0%} of HBM.", "",
             f"Roofline: {FORMULA}. *ideal*: the FLOPs and bytes any implementation of the sharding "
             "needs (jaxpar.experiment.cost_model); *compiled*: what XLA:CPU reports for jaxpar's program "
             "(reference kernels, float32 copies of bf16 operands). Communication is read from the compiled "
             "program in both.", ""]
    inference = any(m in results["modes"] for m in ("prefill", "extend", "decode"))
    head = ("| policy | devices | mesh | batch | params GiB | cache GiB | temp GiB (XLA:CPU) | fits | "
            "TTFT ms ideal | TTFT ms compiled | TPOT ms ideal | TPOT ms compiled | tok/s/device ideal | "
            "bound prefill/decode | comm / min (decode) |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)] if inference else []
    for row in rows if inference else []:
        label = _label(row, rows)
        if "error" in row:
            lines.append(f"| {label} | - | - | - | - | - | - | error | {row['error']} | | | | | | |")
            continue
        mem, ideal, comp = row["memory"], row["predicted"], row["predicted_compiled"]
        mesh = "x".join(f"{k}{v}" for k, v in row["mesh"].items() if v > 1) or "1"
        if row["stages"] > 1:
            mesh = f"pp{row['stages']} x ({mesh})"
        temp = max(mem["temp_bytes"].values(), default=0)
        tps = ideal.get("tokens_per_s_per_device")
        lines.append(
            f"| {label} | {row['devices']} | {mesh} | {row['batch']} | {_gib(mem['param_bytes'])} | "
            f"{_gib(mem['cache_bytes'])} | {_gib(temp)} | {mem['fits']} | {_ms(ideal.get('ttft_s'))} | "
            f"{_ms(comp.get('ttft_s'))} | {_ms(ideal.get('tpot_s'))} | {_ms(comp.get('tpot_s'))} | "
            f"{'-' if tps is None else f'{tps:,.0f}'} | {_bounds(row)} | {_comm_ratio(row, 'decode')} |")
    train_rows = [r for r in rows if "train" in r]
    if train_rows:
        lines += ["", "Training step (AdamW; parameters and optimizer state in the spec's dtype):", "",
                  "| policy | batch x seq | remat | optimizer | params GiB | optimizer GiB | activations GiB ideal | "
                  "temp GiB (XLA:CPU) | fits | step ms ideal | step ms compiled | tokens/s/device ideal |",
                  "|" + "---|" * 12]
        for r in train_rows:
            t = r["train"]
            if "error" in t:
                lines.append(f"| {_label(r, rows)} | {t['error']} |" + " |" * 10)
                continue
            m = t["memory"]
            lines.append(
                f"| {_label(r, rows)} | {t['batch']} x {t['seq']} | {', '.join(t['remat']) or '-'} | "
                f"{t['optimizer_sharding']} | {_gib(m['param_bytes'])} | {_gib(m['optimizer_bytes'])} | "
                f"{_gib(m.get('activation_bytes', 0))} | {_gib(m['temp_bytes'])} | {m['fits']} | {_ms(t['roofline']['time_s'])} | "
                f"{_ms(t['roofline_compiled']['time_s'])} | {t['tokens_per_s_per_device']:,.0f} |")
    notes = [f"- {_label(r, rows)}: {r['note']}" for r in rows if r.get("note")]
    if any(r.get("stages", 1) > 1 for r in rows if "error" not in r):
        notes.append(f"- pipelines: {next(r['pipeline_formula'] for r in rows if r.get('pipeline_formula'))}")
    if notes:
        lines += ["", "Notes:"] + notes
    return "\n".join(lines) + "\n"


def require_matplotlib():
    """matplotlib.pyplot (Agg backend), or an ImportError saying how to install it."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'jaxpar[experiments]' "
                          "(or pass --no-plots)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_memory(results: dict[str, Any], path: Path) -> Path:
    plt = require_matplotlib()
    rows = [r for r in results["rows"] if "error" not in r]
    labels = [_label(r, rows) for r in rows]
    params = [r["memory"]["param_bytes"] / 2**30 for r in rows]
    cache = [r["memory"]["cache_bytes"] / 2**30 for r in rows]
    temp = [max(r["memory"]["temp_bytes"].values(), default=0) / 2**30 for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows) + 2), 4.5))
    x = range(len(rows))
    ax.bar(x, params, label="parameters")
    ax.bar(x, cache, bottom=params, label="KV / state cache")
    ax.bar(x, temp, bottom=[p + c for p, c in zip(params, cache)], label="temporaries (XLA:CPU)", alpha=0.6)
    cap = results["hardware"]["hbm_bytes"] / 2**30
    ax.axhline(cap, color="k", linestyle="--", linewidth=1, label=f"HBM ({cap:.0f} GiB)")
    ax.axhline(cap * results["memory_fraction"], color="gray", linestyle=":", linewidth=1,
               label=f"{results['memory_fraction']:.0%} of HBM")
    for i, r in enumerate(rows):
        if r["memory"]["fits"] != "yes":
            ax.text(i, params[i] + cache[i] + temp[i], "does not fit" if r["memory"]["fits"] == "no" else "temp!",
                    ha="center", va="bottom", color="red", fontsize=8)
    ax.set_xticks(list(x), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("GiB per device")
    ax.set_title(f"{results['spec']}: memory per device ({results['hardware']['name']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency(results: dict[str, Any], path: Path) -> Path:
    plt = require_matplotlib()
    rows = [r for r in results["rows"] if "error" not in r]
    labels = [_label(r, rows) for r in rows]
    metrics = [(k, t) for k, t in (("ttft_s", "TTFT (prefill)"), ("tpot_s", "TPOT (decode)"))
               if any(k in r["predicted"] for r in rows)]
    fig, axes = plt.subplots(1, max(len(metrics), 1), figsize=(max(7, 1.4 * len(rows) * len(metrics) + 2), 4.5),
                             squeeze=False)
    x = list(range(len(rows)))
    for ax, (key, title) in zip(axes[0], metrics):
        ideal = [r["predicted"].get(key, 0) * 1e3 for r in rows]
        comp = [r["predicted_compiled"].get(key, 0) * 1e3 for r in rows]
        ax.bar([i - 0.2 for i in x], ideal, width=0.4, label="ideal kernels")
        ax.bar([i + 0.2 for i in x], comp, width=0.4, label="as compiled (XLA:CPU costs)", alpha=0.7)
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("ms (roofline)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(f"{results['spec']}: predicted latency on {results['hardware']['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _along_stages(row: dict[str, Any], mode: str, key: str) -> float:
    """A step's per-device quantity summed over the stages a token crosses."""
    details = row["stage_details"]
    return sum(details[i]["modes"][mode][key] for i in row.get("stage_of", range(len(details))))


def plot_comm(results: dict[str, Any], path: Path) -> Path:
    plt = require_matplotlib()
    rows = [r for r in results["rows"] if "error" not in r]
    modes = [m for m in ("prefill", "extend", "decode") if m in results["modes"]]
    fig, axes = plt.subplots(1, max(len(modes), 1), figsize=(max(7, 1.2 * len(rows) * len(modes) + 2), 4.5),
                             squeeze=False)
    labels = [_label(r, rows) for r in rows]
    x = list(range(len(rows)))
    for ax, mode in zip(axes[0], modes):
        meas = [_along_stages(r, mode, "collective_wire_bytes") / 2**20 for r in rows]
        mins = [_along_stages(r, mode, "analytic_min_wire_bytes") / 2**20 for r in rows]
        ax.bar([i - 0.2 for i in x], meas, width=0.4, label="compiled HLO")
        ax.bar([i + 0.2 for i in x], mins, width=0.4, label="analytic minimum", alpha=0.7)
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("MiB sent per device (ring; pipelines: summed over the stages)")
        ax.set_title(f"{mode}: communication per step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_train_memory(results: dict[str, Any], path: Path) -> Path:
    plt = require_matplotlib()
    rows = [r for r in results["rows"] if "error" not in r and "error" not in r.get("train", {"error": 1})]
    labels = [_label(r, rows) for r in rows]
    parts = [("param_bytes", "parameters"), ("param_bytes", "gradients"), ("optimizer_bytes", "optimizer state"),
             ("activation_bytes", "activations kept for the backward (ideal)")]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows) + 2), 4.5))
    x = list(range(len(rows)))
    bottom = [0.0] * len(rows)
    for key, name in parts:
        values = [r["train"]["memory"].get(key, 0) / 2**30 for r in rows]
        ax.bar(x, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, r in enumerate(rows):  # what XLA:CPU's program would need, for comparison
        ax.text(i, bottom[i], f"XLA:CPU: {(r['train']['memory']['param_bytes'] + r['train']['memory']['optimizer_bytes'] + r['train']['memory']['temp_bytes']) / 2**30:,.0f} GiB",
                ha="center", va="bottom", fontsize=7)
    cap = results["hardware"]["hbm_bytes"] / 2**30
    ax.axhline(cap, color="k", linestyle="--", linewidth=1, label=f"HBM ({cap:.0f} GiB)")
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("GiB per device")
    ax.set_title(f"{results['spec']}: training memory per device ({results['hardware']['name']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_report(results: dict[str, Any], out: str | Path, *, plots: bool = True) -> dict[str, Path]:
    """Writes results.json, results.md and (with `plots`) memory.png, latency.png and
    comm.png under `out`; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "results.json", "markdown": out / "results.md"}
    _atomic_write(files["json"], json.dumps(results, indent=1, default=str))
    _atomic_write(files["markdown"], markdown(results))
    ok = [r for r in results["rows"] if "error" not in r]
    if plots and ok and any(m in results["modes"] for m in ("prefill", "extend", "decode")):
        files["memory_plot"] = plot_memory(results, out / "memory.png")
        files["latency_plot"] = plot_latency(results, out / "latency.png")
        files["comm_plot"] = plot_comm(results, out / "comm.png")
    if plots and any("error" not in r.get("train", {"error": 1}) for r in ok):
        files["train_memory_plot"] = plot_train_memory(results, out / "memory_train.png")
    return files
