"""Hardware profiles for the roofline: memory, bandwidths and peak FLOP/s of one device.

Every number comes from the vendor's public specification (URLs in `sources`), except the
per-hop link latency, which no datasheet gives: it is an assumption, marked as such.
Datasheet FLOP/s are quoted "with sparsity" for NVIDIA parts; the dense figure is half.
NVLink bandwidth is quoted bidirectional per GPU (18 links); one direction is half.
A profile is a named preset here, a YAML file, or a mapping with the same keys.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import yaml

GB = 1e9
TB = 1e12


class HardwareError(ValueError):
    """A hardware profile is unknown or malformed."""


@dataclasses.dataclass(frozen=True)
class HardwareProfile:
    name: str
    hbm_bytes: float  # device memory
    hbm_bandwidth: float  # bytes/s
    # Dense peak FLOP/s per dtype name ("bfloat16", "float16", "float32").
    peak_flops: tuple[tuple[str, float], ...]
    link_bandwidth: float  # bytes/s of one link, one direction
    links: int  # links a collective drives at once (its bandwidth is links * link_bandwidth)
    link_latency: float = 1e-6  # s per message step of a ring collective (assumed)
    sources: tuple[str, ...] = ()
    notes: str = ""

    def flops(self, dtype: str) -> float:
        table = dict(self.peak_flops)
        if dtype not in table:
            raise HardwareError(f"hardware {self.name!r} has no peak FLOP/s for {dtype} "
                                f"(it lists {', '.join(table)})")
        return table[dtype]

    @property
    def interconnect_bandwidth(self) -> float:
        """Bytes/s one device sends into a collective (one direction)."""
        return self.links * self.link_bandwidth

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["peak_flops"] = dict(self.peak_flops)
        d["interconnect_bandwidth"] = self.interconnect_bandwidth
        return d


_NVLINK4 = 25 * GB  # NVLink 4: 50 GB/s per link bidirectional, 18 links = 900 GB/s per GPU
_NVLINK5 = 50 * GB  # NVLink 5: 100 GB/s per link bidirectional, 18 links = 1.8 TB/s per GPU
_ASSUMED_LATENCY = "link_latency 1 us per ring step is an assumption (no datasheet gives it)"

PROFILES: dict[str, HardwareProfile] = {
    "h100": HardwareProfile(
        name="h100", hbm_bytes=80 * GB, hbm_bandwidth=3.35 * TB,
        # BF16/FP16 Tensor Core 1,979 TFLOPS with sparsity; TF32 989 with sparsity.
        peak_flops=(("bfloat16", 989.5e12), ("float16", 989.5e12), ("float32", 494.5e12)),
        link_bandwidth=_NVLINK4, links=18,
        sources=("https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM: 80 GB HBM3, 3.35 TB/s, "
                 "BF16 1,979 TFLOPS sparse, NVLink 900 GB/s)",),
        notes=f"H100 SXM5. float32 = TF32 tensor cores. {_ASSUMED_LATENCY}"),
    "h200": HardwareProfile(
        name="h200", hbm_bytes=141 * GB, hbm_bandwidth=4.8 * TB,
        peak_flops=(("bfloat16", 989.5e12), ("float16", 989.5e12), ("float32", 494.5e12)),
        link_bandwidth=_NVLINK4, links=18,
        sources=("https://www.nvidia.com/en-us/data-center/h200/ (H200 SXM: 141 GB HBM3e, 4.8 TB/s, "
                 "BF16 1,979 TFLOPS sparse, NVLink 900 GB/s)",),
        notes=f"H200 SXM. float32 = TF32 tensor cores. {_ASSUMED_LATENCY}"),
    "b200": HardwareProfile(
        name="b200", hbm_bytes=180 * GB, hbm_bandwidth=8 * TB,
        # HGX B200 (1,000 W): BF16 4.5 PFLOPS sparse, 2.25 dense; TF32 2.2 sparse.
        peak_flops=(("bfloat16", 2.25e15), ("float16", 2.25e15), ("float32", 1.1e15)),
        link_bandwidth=_NVLINK5, links=18,
        sources=("https://www.nvidia.com/en-us/data-center/hgx/ (HGX B200: 8 GPUs, 1.4 TB HBM3e = 180 GB "
                 "per GPU, 8 TB/s per GPU, FP16/BF16 4.5 PFLOPS sparse per GPU, NVLink 5 1.8 TB/s per GPU)",),
        notes=f"HGX B200 per GPU (192 GB physical, 180 GB usable as listed). {_ASSUMED_LATENCY}"),
    "tpu-v5e": HardwareProfile(
        name="tpu-v5e", hbm_bytes=16 * GB, hbm_bandwidth=819 * GB,
        peak_flops=(("bfloat16", 197e12),),
        # 400 GB/s bidirectional ICI per chip over 4 ports: 50 GB/s per port per direction;
        # collectives on the 2D torus drive all 4 ports.
        link_bandwidth=50 * GB, links=4,
        sources=("https://cloud.google.com/tpu/docs/v5e (197 TFLOPs bf16, 16 GB HBM2 at 819 GBps, "
                 "400 GBps bidirectional ICI per chip, 4 ICI ports, 2D torus)",),
        notes=f"no float32 matmul peak is published. {_ASSUMED_LATENCY}"),
}


def _number(raw: Mapping[str, Any], key: str, where: str) -> float:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise HardwareError(f"{where}: {key} must be a positive number, got {value!r}")
    return float(value)


def profile_from_dict(raw: Mapping[str, Any], where: str = "hardware") -> HardwareProfile:
    """A custom profile: {name, hbm_bytes, hbm_bandwidth, peak_flops: {dtype: FLOP/s},
    link_bandwidth, links, link_latency?, sources?, notes?} (SI units: bytes, bytes/s, s)."""
    if not isinstance(raw, Mapping):
        raise HardwareError(f"{where}: a hardware profile must be a mapping, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(HardwareProfile)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise HardwareError(f"{where}: unknown key(s) {unknown} (known: {', '.join(sorted(known))})")
    flops = raw.get("peak_flops")
    if not isinstance(flops, Mapping) or not flops:
        raise HardwareError(f"{where}: peak_flops must map dtype names to FLOP/s, got {flops!r}")
    links = raw.get("links")
    if isinstance(links, bool) or not isinstance(links, int) or links < 1:
        raise HardwareError(f"{where}: links must be a positive integer, got {links!r}")
    sources = raw.get("sources") or ()
    return HardwareProfile(
        name=str(raw.get("name") or "custom"), hbm_bytes=_number(raw, "hbm_bytes", where),
        hbm_bandwidth=_number(raw, "hbm_bandwidth", where),
        peak_flops=tuple((str(k), _number(flops, k, f"{where}.peak_flops")) for k in flops),
        link_bandwidth=_number(raw, "link_bandwidth", where), links=links,
        link_latency=_number(raw, "link_latency", where) if "link_latency" in raw else 1e-6,
        sources=tuple(sources) if isinstance(sources, (list, tuple)) else (str(sources),),
        notes=str(raw.get("notes") or ""))


def load_profile(ref: str | Path | Mapping[str, Any] | HardwareProfile, base: Path | None = None) -> HardwareProfile:
    """A preset name (h100, h200, b200, tpu-v5e), a YAML file, or a mapping."""
    if isinstance(ref, HardwareProfile):
        return ref
    if isinstance(ref, Mapping):
        return profile_from_dict(ref)
    text = str(ref)
    if text.lower() in PROFILES:
        return PROFILES[text.lower()]
    path = Path(text)
    if not path.is_absolute() and base is not None:
        path = base / path
    if path.suffix in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise HardwareError(f"hardware profile file {path} does not exist")
        return profile_from_dict(yaml.safe_load(path.read_text()), str(path))
    raise HardwareError(f"unknown hardware {text!r} (presets: {', '.join(PROFILES)}; or a YAML file "
                        "or a mapping)")
