"""The engine's per-parameter gradient rules are recorded per index at build time and returned by
IndexDescription and by DescribeIndex over a real gRPC server on 127.0.0.1."""

from __future__ import annotations

import numpy as np


def test_rules_recorded_and_served(tmp_path):
    import torch

    from indexer.config import parse_config
    from indexer.demo import load_digits_28
    from indexer.embedder import load_engines
    from indexer.query import list_indexes, open_index
    from server.app import GradIndexServer
    from server.client import GradIndexClient
    from server.config import ServerConfig
    from server.demo import CONFIG, ensure_digits_index

    torch.set_num_threads(1)
    name = ensure_digits_index(tmp_path, n=24, progress=False)
    # The independent reference: a fresh engine on the same config, checked on two examples.
    import tomllib

    raw = tomllib.loads(CONFIG.read_text())
    raw["data"]["path"] = str(tmp_path / "digits_24.npz")
    eng = load_engines(parse_config(raw, CONFIG.parent))[0]
    X, y = load_digits_28()
    eng.grads(X[:2].astype(np.float32), y[:2])
    assert eng.verified and eng.rules

    d = open_index(tmp_path, name).describe()
    assert d.parameter_rules == eng.rules and d.rules_verified is True
    assert [x.parameter_rules for x in list_indexes(tmp_path)] == [eng.rules]  # without loading the model

    srv = GradIndexServer(ServerConfig(workdir=str(tmp_path), indexes=[name], port=0)).start()
    try:
        info = GradIndexClient(f"127.0.0.1:{srv.port}").describe_index(name)
        assert dict(info.parameter_rules) == eng.rules and info.HasField("rules_verified") and info.rules_verified
        assert "parameter_rules" not in info.details.fields  # typed field, not duplicated in details
    finally:
        srv.stop(0)
