"""`jaxpar experiment SPEC.yaml --out DIR` (wired into jaxpar.cli)."""

from __future__ import annotations

import logging
import sys


def add_experiment_parser(sub) -> None:
    p = sub.add_parser("experiment",
                       help="compare sharding policies at real scale without weights: compile-only "
                            "analysis on abstract CPU devices, roofline TTFT / TPOT, plots")
    p.add_argument("spec", help="experiment spec (YAML): models, policies, workloads, hardware "
                                "(examples/experiments/*.yaml)")
    p.add_argument("--out", required=True,
                   help="folder for results.json, results.md and the PNG plots")
    p.add_argument("--no-plots", action="store_true", help="skip the plots (no matplotlib needed)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_experiment)


def _experiment(args) -> int:
    from jaxpar.experiment.report import write_report
    from jaxpar.experiment.run import ensure_cpu_devices, required_devices, run_experiment
    from jaxpar.experiment.spec import load_spec

    spec = load_spec(args.spec)
    if not args.no_plots:
        from jaxpar.experiment.report import require_matplotlib

        try:
            require_matplotlib()  # fail before the compiles, not after
        except ImportError as e:
            print(f"jaxpar: error: {e}", file=sys.stderr)
            return 2
    # Before JAX starts its backends: as many abstract CPU devices as the largest policy.
    ensure_cpu_devices(required_devices(spec))
    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        logging.getLogger("jax").setLevel(logging.WARNING)
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    results = run_experiment(spec, progress=progress)
    files = write_report(results, args.out, plots=not args.no_plots)
    print((files["markdown"]).read_text())
    print("wrote " + ", ".join(str(p) for p in files.values()), file=sys.stderr)
    return 0
