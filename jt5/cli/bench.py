"""`jt5 bench NAME [ARGS...]`: run a benchmark script from benchmarks/ (source checkouts)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "run a benchmark script from benchmarks/ (jt5 bench NAME [ARGS...])"
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def add(p: argparse.ArgumentParser):
    p.add_argument("name", help="benchmark script in benchmarks/ (e.g. attention, generate, train)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")


def run(args) -> int:
    import runpy

    script = BENCHMARKS / f"{args.name}.py"
    if not script.is_file():
        found = sorted(f.stem for f in BENCHMARKS.glob("*.py")) if BENCHMARKS.is_dir() else []
        raise FileNotFoundError(f"no benchmark {args.name!r} in {BENCHMARKS} (have: {found}); "
                                f"benchmarks ship with the source tree, not the wheel")
    sys.argv = [str(script), *args.args]
    runpy.run_path(str(script), run_name="__main__")
    return 0

