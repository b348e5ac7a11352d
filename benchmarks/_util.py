"""Shared benchmark helpers: thread pinning, repeated timing with medians, RSS, ratio printing,
and starting ``gradindex serve`` in a subprocess."""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def pin_threads(n: int = 1) -> None:
    """Pin BLAS/OpenMP, torch and TensorFlow to ``n`` threads so figures are comparable run to run."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        pass


def pin_tf_threads(n: int = 1) -> None:
    """Pin TensorFlow's thread pools (must run before TensorFlow executes anything)."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(n)
    except RuntimeError:
        pass


def median_time(fn: Callable[[], Any], repeat: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeat`` runs after ``warmup`` runs (seconds)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def engine_rates(eng: Any, X: Any, y: Any, repeat: int) -> dict[str, float]:
    """Examples/s of a gradient engine over ``X``: gradients kept per layer (blocks) and flattened
    into rows (one reused buffer), each the median of ``repeat`` timed runs."""

    def blocks() -> None:
        for _ in eng.iter_blocks(X, y):
            pass

    def flat() -> None:
        for _ in eng.iter_grads(X, y, reuse_buffer=True):
            pass

    return {"engine, per layer": len(X) / median_time(blocks, repeat),
            "engine, flat rows": len(X) / median_time(flat, repeat)}


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far (bytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    """Current resident set size (bytes)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Context manager sampling this process's RSS every millisecond; ``.peak`` is the growth over the start.

    ru_maxrss cannot be reset, so a peak reached before (imports, warm-up) would hide the one being
    measured; sampling measures just the block inside the ``with``.
    """

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = False

    def __enter__(self) -> "PeakRSS":
        import threading

        self.base = rss_bytes()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, rss_bytes() - self.base)
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, rss_bytes() - self.base)


def row(label: str, value: float, unit: str, baseline: float | None = None, baseline_name: str = "",
        higher_is_better: bool = True) -> str:
    """One printed figure, with its ratio against the named baseline measured in the same run."""
    s = f"  {label:<52s} {value:>12.2f} {unit}"
    if baseline:
        s += f"   ({value / baseline:.2f}x {baseline_name})"
    return s


def start_serve(config: Path, cwd: Path) -> tuple[subprocess.Popen, int, int | None]:
    """Start ``gradindex serve --config config`` in its own process and wait until it serves.

    The server gets one thread per framework, unbuffered output and at most two malloc arenas
    (otherwise glibc gives each of the many handler threads its own arena, which shows up as RSS
    that grows with the concurrency level, not with the number of requests). Returns the process,
    its gRPC port and its metrics port (None when metrics are off); raises if it does not start.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", MALLOC_ARENA_MAX="2")
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--config", str(config)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = proc.stdout.readline()  # "gradindex: serving [...] on HOST:PORT[, metrics on :MPORT]"
    if "serving" not in line:
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    port = int(line.split(" on ")[1].split(":")[1].split(",")[0])
    mport = int(line.rsplit(":", 1)[1]) if ", metrics on :" in line else None
    return proc, port, mport
