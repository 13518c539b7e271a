"""`jaxpar convert {hf-to-orbax, orbax-to-hf, inspect}` (wired into jaxpar.cli)."""

from __future__ import annotations

import contextlib
import json
import signal
import sys

DTYPE_CHOICES = ["auto", "float32", "bfloat16", "float16"]


def add_convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert checkpoints: HF safetensors / GGUF <-> Orbax, inspect")
    conv = p.add_subparsers(dest="convert_command", required=True, metavar="{hf-to-orbax,orbax-to-hf,inspect}")

    a = conv.add_parser("hf-to-orbax", help="HF folder, Llama .gguf or alias -> Orbax checkpoint (streamed)")
    a.add_argument("src", help="HF model folder (safetensors), a Llama .gguf file, or an alias (smollm2-135m)")
    a.add_argument("dst", help="the Orbax checkpoint folder to write (must not exist unless --overwrite)")
    a.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="dtype to store (default auto: the source's; float32 for GGUF)")
    a.add_argument("--policy", default=None,
                   help="rule table (preset or YAML) to place tensors with while converting "
                        "(default: one device); any policy can restore the result")
    a.add_argument("--group-size", default="128MiB",
                   help="bytes of tensors held in memory and saved together (default 128MiB); "
                        "peak memory is about 3x the larger of this and the largest tensor")
    a.add_argument("--compress", action="store_true",
                   help="zstd-compress the stored chunks (smaller on disk, slower to restore)")
    a.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    a.set_defaults(func=_hf_to_orbax)

    b = conv.add_parser("orbax-to-hf", help="Orbax checkpoint -> HF folder (safetensors + config + tokenizer)")
    b.add_argument("src", help="an Orbax checkpoint folder written by hf-to-orbax")
    b.add_argument("dst", help="the HF folder to write (must not exist unless --overwrite)")
    b.add_argument("--max-shard-size", default="5GB",
                   help="largest .safetensors file before sharding with an index (default 5GB)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    b.set_defaults(func=_orbax_to_hf)

    c = conv.add_parser("inspect", help="tensors, shapes, dtypes and bytes of an Orbax checkpoint")
    c.add_argument("dir", help="an Orbax checkpoint folder written by hf-to-orbax")
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.set_defaults(func=_inspect)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _interruptible():
    """SIGTERM unwinds like Ctrl-C, so the temporary folder is removed."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _quiet_orbax() -> None:
    import logging

    with contextlib.suppress(Exception):
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)


def _run(args, fn) -> int:
    _quiet_orbax()
    try:
        with _interruptible():
            dst = fn()
    except KeyboardInterrupt:
        print(f"jaxpar: interrupted; {args.dst} was not written", file=sys.stderr)
        return 130
    print(f"wrote {dst}", file=sys.stderr)
    return 0


def _hf_to_orbax(args) -> int:
    from jaxpar.checkpoint.export_hf import parse_size
    from jaxpar.checkpoint.orbax_io import hf_to_orbax

    group = parse_size(args.group_size)
    return _run(args, lambda: hf_to_orbax(args.src, args.dst, dtype=args.dtype, policy=args.policy,
                                          overwrite=args.overwrite, group_bytes=group,
                                          compress=args.compress, progress=sys.stderr.isatty()))


def _orbax_to_hf(args) -> int:
    from jaxpar.checkpoint.export_hf import orbax_to_hf

    return _run(args, lambda: orbax_to_hf(args.src, args.dst, max_shard_size=args.max_shard_size,
                                          overwrite=args.overwrite, progress=sys.stderr.isatty()))


def _inspect(args) -> int:
    from jaxpar.checkpoint.inspect import format_report, inspect_checkpoint

    _quiet_orbax()
    report = inspect_checkpoint(args.dir)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0
