"""Query-path figures of this checkout against another commit's, measured in the same run.

Runs ``benchmarks/bench_server.py`` of both checkouts alternately (base, head, base, head, ...)
at each projection dimension, so that both see the same machine load, and prints per figure the
median over rounds for each checkout and the ratio head/base: single-query FindSimilar p50 over
gRPC (batching off and on; lower is better) and the loopback load test's qps per concurrency
level (batching on, round 1; higher is better). Each bench_server run pins torch/BLAS/OpenMP to
one thread on both sides.

    git worktree add --detach ../base <commit>          # and generate its stubs: python -m server.protos
    python benchmarks/bench_compare.py --base ../base --quick --dims 512 2048
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SINGLE = re.compile(r"batching\s+(on|off): p50 ([\d.]+) ms, p99 ([\d.]+) ms")
ROW = re.compile(r"^\s+(on|off)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s")


def run(tree: Path, dim: int, extra: list[str], log) -> dict[str, float]:
    """One bench_server run of ``tree``; the figures it printed, by name."""
    cmd = [sys.executable, str(tree / "benchmarks" / "bench_server.py"), "--proj-dim", str(dim),
           "--workdir", str(tree / "benchmarks" / "out" / "bench_compare"), *extra]
    out = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env={"PYTHONPATH": str(tree),
                                                                           **_env()})
    log.write(f"$ (cd {tree} && {' '.join(cmd[1:])})\n{out.stdout}\n")
    if out.returncode not in (0, 1):
        raise RuntimeError(f"bench_server failed in {tree}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    figs: dict[str, float] = {}
    for m in SINGLE.finditer(out.stdout):
        figs[f"single p50 ms, batching {m.group(1)}"] = float(m.group(2))
    for line in out.stdout.splitlines():
        m = ROW.match(line)
        if m and m.group(2) == "1":
            figs[f"qps, {m.group(3)} clients, batching {m.group(1)}"] = float(m.group(4))
            if int(m.group(7)):
                figs[f"errors, {m.group(3)} clients, batching {m.group(1)}"] = float(m.group(7))
    return figs


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="checkout of the commit to compare against")
    ap.add_argument("--dims", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--rounds", type=int, default=2, help="runs per checkout and dimension (median reported)")
    ap.add_argument("--log", default=str(ROOT / "benchmarks" / "out" / "bench_compare_runs.txt"),
                    help="where the full output of every run goes")
    args, extra = ap.parse_known_args(argv)
    base, head = Path(args.base).resolve(), ROOT
    print(f"head: {head}\nbase: {base}\nbench_server.py options: {' '.join(extra) or '(defaults)'}; "
          f"{args.rounds} rounds, alternating base/head; medians; ratio = head / base\n")
    with open(args.log, "w") as log:
        for dim in args.dims:
            got: dict[str, dict[str, list[float]]] = {"base": {}, "head": {}}
            for _ in range(args.rounds):
                for name, tree in (("base", base), ("head", head)):
                    for k, v in run(tree, dim, extra, log).items():
                        got[name].setdefault(k, []).append(v)
            print(f"{dim} projection dims:")
            print(f"  {'figure':<34} {'base':>9} {'head':>9} {'head/base':>10}")
            for k in sorted(set(got["base"]) | set(got["head"])):
                b = statistics.median(got["base"][k]) if k in got["base"] else float("nan")
                h = statistics.median(got["head"][k]) if k in got["head"] else float("nan")
                better = "lower is better" if k.startswith(("single", "errors")) else "higher is better"
                print(f"  {k:<34} {b:>9.2f} {h:>9.2f} {h / b if b else float('nan'):>9.2f}x  ({better})")
            print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
