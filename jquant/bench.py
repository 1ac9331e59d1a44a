"""``python -m jquant.bench``: jquant vs torch vs a plain copy, side by side in one process.

Runs on whatever device JAX sees (torch on CPU, when installed). Prints a table of median
times and the ratios jquant/torch and jquant/copy. Suites: core (issue 1), and the ones
registered in :data:`SUITES` below as they exist.
"""
from __future__ import annotations

import argparse
import importlib
import sys

import jax

from jquant._bench import Context, format_table

SUITES = ("core", "histogram", "qat", "convert")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jquant.bench", description=__doc__)
    p.add_argument("--suites", default=",".join(SUITES),
                   help=f"comma-separated subset of {','.join(SUITES)}")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats (smoke test)")
    p.add_argument("--no-torch", action="store_true", help="skip torch even if installed")
    args = p.parse_args(argv)
    torch = None
    if not args.no_torch:
        try:
            import torch  # noqa: F811
        except ImportError:
            torch = None
    ctx = Context(repeats=args.repeats, warmup=args.warmup, quick=args.quick, torch=torch)
    if args.quick:
        ctx.sizes = (10 ** 4,)
        ctx.repeats = min(ctx.repeats, 3)
        ctx.warmup = 1
    dev = jax.devices()[0]
    print(f"jquant bench: jax {jax.__version__} on {dev.platform} ({dev.device_kind}); "
          f"torch {getattr(torch, '__version__', 'not installed')}"
          + (f" with {torch.get_num_threads()} threads" if torch else ""))
    rows = []
    for name in [s.strip() for s in args.suites.split(",") if s.strip()]:
        if name not in SUITES:
            p.error(f"unknown suite {name!r}")
        try:
            mod = importlib.import_module(f"jquant._bench.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"jquant._bench.{name}":
                continue  # suite not written yet
            raise
        rows.extend(mod.run(ctx))
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
