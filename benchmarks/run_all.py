"""Run every benchmark script present, then render ``BENCHMARKS.md`` and its plots from the results.

Each benchmark (``bench_codec.py``, ``bench_delta_codes.py``, ``bench_kernels.py``, ``bench_conversion.py``,
``bench_modes.py``, ``sass_counts.py``) runs as its own subprocess with its output streamed, and writes its JSON file
into ``benchmarks/results/``; a missing script is skipped with a note, a failing one is reported
and the others still run. The report (``benchmarks/report.py``) is then rendered from whatever
JSON files are there, including those of earlier runs.

Usage::

    python benchmarks/run_all.py                       # everything, then BENCHMARKS.md
    python benchmarks/run_all.py --only codec,modes    # just these (names with or without bench_ / .py)
    python benchmarks/run_all.py --skip conversion
    python benchmarks/run_all.py --report-only         # re-render BENCHMARKS.md from the existing JSON

Exit status: 0 when every benchmark that ran succeeded, 1 when one failed (the report is rendered anyway),
2 on a usage error.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE.parent) not in sys.path:  # `python benchmarks/run_all.py` from a checkout: make `benchmarks` importable
    sys.path.insert(0, str(HERE.parent))

from benchmarks.report import BENCHMARKS, render_report  # noqa: E402


def normalize(name: str) -> str:
    """``'bench_codec.py'`` / ``'bench_codec'`` / ``'codec'`` -> ``'codec'``."""
    name = name.strip()
    name = name[:-3] if name.endswith(".py") else name
    return name[len("bench_"):] if name.startswith("bench_") else name


def parse_names(ap: argparse.ArgumentParser, values: list[str] | None) -> list[str]:
    """Benchmark names from repeated and/or comma-separated options; unknown names are a usage error."""
    names = [normalize(n) for v in values or [] for n in v.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    return names


def run_benchmark(name: str, script: Path, extra: list[str]) -> tuple[int, float]:
    """Run one benchmark script as a subprocess (output streamed); returns (exit status, seconds)."""
    env = dict(os.environ)
    # The scripts import tpde_hf; from a checkout without `pip install -e .` the source tree must be on the path.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(script), *extra]
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    try:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode
    except KeyboardInterrupt:
        rc = 130
    return rc, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=f"Benchmarks: {', '.join(BENCHMARKS)}.")
    ap.add_argument("--only", action="append", metavar="NAME", help="run only these (repeatable or comma-separated)")
    ap.add_argument("--skip", action="append", metavar="NAME", help="do not run these (repeatable or comma-separated)")
    ap.add_argument("--report-only", action="store_true", help="run nothing; re-render BENCHMARKS.md from the JSON")
    ap.add_argument("--results", type=Path, default=HERE / "results", help="results folder (default: %(default)s)")
    ap.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="report (default: %(default)s)")
    ap.add_argument("--bench-dir", type=Path, default=HERE, help=argparse.SUPPRESS)  # tests point it at fakes
    ap.add_argument("--quick", action="store_true",
                    help="pass --quick to the benchmarks that accept it (smoke run; figures not representative)")
    args = ap.parse_args(argv)
    only, skip = parse_names(ap, args.only), parse_names(ap, args.skip)

    failed: list[str] = []
    summary: list[str] = []
    if not args.report_only:
        for name, (_file, script_name, _purpose) in BENCHMARKS.items():
            if (only and name not in only) or name in skip:
                summary.append(f"{name}: not selected")
                continue
            script = args.bench_dir / script_name
            if not script.is_file():
                summary.append(f"{name}: skipped, {script} does not exist (yet)")
                print(f"\n=== {name}: {script} not found; skipped", flush=True)
                continue
            # Only some scripts have a smoke mode; passing an unknown flag would make argparse fail the others.
            extra = ["--quick"] if args.quick and "--quick" in script.read_text() else []
            rc, seconds = run_benchmark(name, script, extra)
            if rc != 0:
                failed.append(name)
            summary.append(f"{name}: {'ok' if rc == 0 else f'FAILED (exit status {rc})'} in {seconds:.0f} s")

    result = render_report(args.results, args.output)
    print("\n=== summary", flush=True)
    for line in summary:
        print(f"  {line}")
    print(f"  report: {args.output} ({len(result.sections)} result files: {', '.join(result.sections) or 'none'}; "
          f"plots: {', '.join(p.name for p in result.plots) or 'none'})")
    for note in result.notes:
        print(f"  note: {note}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
