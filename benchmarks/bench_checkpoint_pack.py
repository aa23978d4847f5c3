"""One checkpoint pack (issue 21): CPU per save and the wait at a save reproduced, code trees alternated.

Takes three consecutive plain checkpoints of a run (``bench_checkpoints.py --train-only``: MiniLM MLM, AdamW fp32),
copies them to a scratch folder and, in a fresh process per measurement:

* ``cpu``: packs the first against the second and the second against the third through
  ``backward.advance`` (two warm saves), then times the pack of the third's predecessor: wall and process CPU
  seconds of one save on serial kernels, as the packing thread runs them;
* ``wait``: the same pack on a thread with the :class:`~tpde_hf.checkpoints.assist.Assist` runner while the main
  thread helps from the start, both at normal priority (the callback's wait at the next save, when nothing of
  the pack ran beside training), with a timeline of its phases, the cores it used and, per thread, the time in
  jobs (``threads``: how long both threads, one, or none ran a job: the serial parts).
  As each tree's callback does: code whose ``Assist`` has ``wake`` wakes the helping thread as the pack ends
  (older code: the helper polls).

Each code tree (``--trees``: folders whose ``tpde_hf`` is imported first, e.g. a ``git archive`` of HEAD; ``.``
is the working tree) is run in turn, ``--repeat`` times, so that trees are compared in the same minutes.
The stored size over raw is recorded for every pack (it must not change between trees).

Run (under the bench lock): ``python benchmarks/bench_checkpoint_pack.py --run /tmp/run/plain --trees
/tmp/before,. --out benchmarks/results/checkpoints_s6_cpu_per_save.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r'''
import json, os, shutil, sys, threading, time
from pathlib import Path
from tpde_hf.checkpoints import backward as B, kernels as K, store as S
from tpde_hf.checkpoints.assist import Assist
run, work, what, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
steps = sorted((d for d in run.glob("checkpoint-*")), key=lambda d: int(d.name.split("-")[1]))[-3:]
shutil.rmtree(work, ignore_errors=True)
work.mkdir(parents=True)
for d in steps:
    shutil.copytree(d, work / d.name)
with K.serial(True):
    _, head = B.advance(work / steps[0].name, keyframe_every=8, param_names=names)
    _, head = B.advance(work / steps[1].name, keyframe_every=8, param_names=names, cache=head)
marks = []
t0 = [0.0]
def _busy(spans, wall):
    """Seconds each thread spent in jobs, and of the wall time: both threads in a job, one, none (serial parts:
    the phases outside the job lists, e.g. the entry's write)."""
    edges = sorted({0.0, wall, *(x for _, a, b in spans for x in (a, b))})
    both = one = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        mid = (lo + hi) / 2
        n = len({th for th, a, b in spans if a <= mid < b})
        both += (hi - lo) * (n >= 2)
        one += (hi - lo) * (n == 1)
    per = {}
    for th, a, b in spans:
        per[th] = per.get(th, 0.0) + b - a
    return {"in_jobs_s": {k: round(v, 3) for k, v in per.items()}, "both_busy_s": round(both, 3),
            "one_busy_s": round(one, 3), "no_job_s": round(wall - both - one, 3)}
def mark(w):
    marks.append((round(time.perf_counter() - t0[0], 3), w))
out = {"tpde_hf": __import__("tpde_hf").__file__, "loadavg": os.getloadavg()}
if what == "cpu":
    t = time.perf_counter(); c = time.process_time()
    with K.serial(True):
        done, _ = B.advance(work / steps[2].name, keyframe_every=8, param_names=names, cache=head)
    out.update(wall_s=time.perf_counter() - t, cpu_s=time.process_time() - c)
else:
    for mod, fn in ((S, "read_checkpoint"), (S, "write_entry"), (S, "check_entry"), (B, "release")):
        real = getattr(mod, fn)
        def wrap(*a, _real=real, _fn=fn, **k):
            mark(_fn + " start"); r = _real(*a, **k); mark(_fn + " end"); return r
        setattr(mod, fn, wrap)
    spans = []  # (thread, start, end) of each job a thread ran at its top level (a fork's runs inside it excluded)
    depth = threading.local()
    real_run = Assist._run
    def timed_run(self, job):
        d = getattr(depth, "n", 0)
        depth.n = d + 1
        t = time.perf_counter()
        try:
            real_run(self, job)
        finally:
            depth.n = d
            if d == 0:
                spans.append((threading.current_thread().name, t - t0[0], time.perf_counter() - t0[0]))
    Assist._run = timed_run
    assist = Assist()
    class Runner:
        def __call__(self, fn, items):
            items = list(items); mark(f"jobs: {len(items)} start"); r = assist.map(fn, items); mark("jobs end")
            return r
        fork = getattr(assist, "fork", None)
    runner = Runner() if hasattr(assist, "fork") else Runner().__call__
    res = {}
    wake, ended = getattr(assist, "wake", None), threading.Event()  # as the tree's callback ends a wait
    def pack():
        try:
            with K.serial(True):
                res["done"], _ = B.advance(work / steps[2].name, keyframe_every=8, param_names=names, cache=head,
                                           runner=runner)
        finally:
            if wake is not None:
                ended.set(); wake()
    th = threading.Thread(target=pack, name="pack")
    threading.current_thread().name = "waiting"
    t0[0] = time.perf_counter(); c = time.process_time()
    th.start(); assist.help((lambda: not ended.is_set()) if wake is not None else th.is_alive); th.join()
    wall, cpu = time.perf_counter() - t0[0], time.process_time() - c
    done = res["done"]
    out.update(wall_s=wall, cpu_s=cpu, cores_used=cpu / wall, helped_jobs=assist.helped, timeline=marks,
               threads=_busy(spans, wall))
out["stored_over_raw"] = done[0]["stored"] / done[0]["raw"]
print(json.dumps(out))
'''


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a plain run's folder with at least 3 checkpoints")
    ap.add_argument("--trees", default=".", help="comma-separated code trees ('.': the working tree)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--what", default="cpu,wait")
    ap.add_argument("--work", default="/tmp/bench-ckpt-pack")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_checkpoints import _param_names

    run = Path(args.run)
    last = sorted(run.glob("checkpoint-*"), key=lambda d: int(d.name.split("-")[1]))[-3:]
    names = _param_names(last[0])
    res: dict = {"benchmark": "bench_checkpoint_pack", "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                 "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "uptime_start": _uptime(),
                 "checkpoints": [d.name for d in last], "trees": args.trees.split(","), "runs": []}
    for _ in range(args.repeat):
        for what in args.what.split(","):
            for tree in args.trees.split(","):
                env = dict(os.environ)
                if tree != ".":
                    env["PYTHONPATH"] = str(Path(tree).resolve())
                p = subprocess.run([sys.executable, "-c", _CHILD, str(run), args.work, what, json.dumps(names)],
                                   capture_output=True, text=True, env=env, cwd="/")  # not ROOT: its tpde_hf would win
                if p.returncode:
                    raise SystemExit(p.stderr[-3000:])
                row = {"tree": tree, "what": what, **json.loads(p.stdout.strip().splitlines()[-1])}
                res["runs"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "timeline"}), flush=True)
    shutil.rmtree(args.work, ignore_errors=True)
    res["uptime_end"] = _uptime()
    res["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
