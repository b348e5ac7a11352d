"""The demo end to end (small): build, serve on a free port, query through the client, PNG;
and the `gradindex query` command against `gradindex serve --demo`-style serving."""

from __future__ import annotations

import numpy as np
import torch

from server.demo import run_demo


def test_demo_builds_serves_queries_and_plots(tmp_path, capsys):
    torch.set_num_threads(1)
    out = run_demo(workdir=tmp_path, out=tmp_path / "fig.png", n_queries=3, k=5, build={"n": 150})
    printed = capsys.readouterr().out
    assert out["ids"].shape == (3, 5) and (out["ids"] >= 0).all() and (out["ids"] < 150).all()
    assert (np.diff(out["scores"], axis=1) <= 0).all()
    assert printed.count("most similar training examples") == 3 and "wrote" in printed
    png = (tmp_path / "fig.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    # Second run: the index is there already, nothing is rebuilt, same answers.
    again = run_demo(workdir=tmp_path, out=tmp_path / "fig2.png", n_queries=3, k=5, build={"n": 150}, verbose=False)
    assert np.array_equal(again["ids"], out["ids"])
