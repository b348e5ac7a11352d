"""SIGTERM drains: `gradindex serve --config` in a subprocess; an in-flight request finishes, health
turns NOT_SERVING, new requests are refused, the process exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import torch

from indexer.demo import load_digits_28
from server.client import GradIndexClient
from server.demo import ensure_digits_index

ROOT = Path(__file__).resolve().parent.parent


def test_sigterm_drains_in_flight_requests(tmp_path):
    torch.set_num_threads(1)
    ensure_digits_index(tmp_path, "digits", n=100, progress=False)
    cfg = tmp_path / "server.toml"
    cfg.write_text(f'workdir = "{tmp_path}"\nport = 0\nmax_batch = 4096\nmax_message_mb = 64\n'
                   'drain_delay_s = 1.0\ngrace_s = 30\n')
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--config", str(cfg)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "serving" in line, line + proc.stderr.read()
        port = int(line.split(" on ")[1].split(":")[1].split(",")[0])
        c = GradIndexClient(f"127.0.0.1:{port}", timeout=60)
        X = load_digits_28()[0][-10:]
        c.find_similar("digits", X[:1], k=2)
        big = np.repeat(X, 80, axis=0)  # 800 queries: about a second of gradients
        result = {}

        def slow():
            try:
                result["res"] = c.find_similar("digits", big, k=2)
            except grpc.RpcError as exc:
                result["err"] = exc

        t = threading.Thread(target=slow)
        t.start()
        time.sleep(0.5)  # the big request is in the gradient stage now
        assert not result, "the slow request finished before SIGTERM; make it bigger"
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert c.health() == "NOT_SERVING"  # within the drain delay: still reachable, not serving
        time.sleep(1.2)  # past the drain delay: new calls are refused
        try:
            c.find_similar("digits", X[:1], k=2, timeout=5)
            refused = None
        except grpc.RpcError as exc:
            refused = exc.code()
        assert refused == grpc.StatusCode.UNAVAILABLE
        t.join(60)
        assert "err" not in result, result.get("err")
        assert result["res"].ids.shape == (800, 2)  # the in-flight request completed
        assert proc.wait(30) == 0
        assert '"event": "stopped"' in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
