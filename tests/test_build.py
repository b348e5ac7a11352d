"""Build pipeline end to end on real FAISS files and SQLite catalogs, checked against an independent
per-example autograd loop; the query API; name collisions; every dataset format."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from indexer.build import build_index
from indexer.catalog import Build, Catalog, Example, IndexRow
from indexer.errors import FailedPrecondition, ModelMismatch, NotFound
from indexer.kernels import scale_query, scale_train, scores
from indexer.projection import ProjectionSpec, Projector, layout_from_json
from indexer.query import list_indexes, open_index
from test_build_support import digits8, load_tiny, loop_grads, write_config, write_model

CE = torch.nn.CrossEntropyLoss()


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    """An unprojected grad_cos index of 150 digits and the loop reference."""
    tmp = tmp_path_factory.mktemp("exact")
    cfg = write_config(tmp, n=150, kernel="grad_cos", chunk_size=64)
    r = build_index(cfg, tmp / "wd", progress=False)
    X, y = digits8(150)
    G = loop_grads(load_tiny(tmp), CE, X, y)
    return tmp, r, X, y, G


def test_exact_index_matches_per_example_loop(exact):
    tmp, r, X, y, G = exact
    assert r.count == 150 and r.dim == G.shape[1] and r.recall_at_10 == 1.0
    assert (tmp / "wd" / r.path).exists() and not (tmp / "wd" / "builds" / "1").exists()  # shards cleaned
    idx = open_index(tmp / "wd", "tiny")
    V, ids = idx.vectors()
    np.testing.assert_array_equal(ids, np.arange(150))
    np.testing.assert_allclose(V, scale_train(G, "grad_cos"), rtol=1e-4, atol=1e-6)
    cat = Catalog(tmp / "wd")
    with cat.session() as s:
        ex = {e.row_id: e for e in s.query(Example).all()}
        b = s.query(Build).one()
        assert b.status == "done" and b.rows_done == 150
    cat.close()
    np.testing.assert_allclose([ex[i].self_influence for i in range(150)], (G.astype(np.float64) ** 2).sum(1), rtol=1e-4)
    assert ex[3].external_id == "ex3" and ex[3].label == str(y[3]) and ex[3].split == "train"


def test_query_api_against_brute_force(exact):
    tmp, r, X, y, G = exact
    idx = open_index(tmp / "wd", "tiny")
    Xq, yq = X[:4] + 0.05, y[:4]
    Gq = loop_grads(load_tiny(tmp), CE, Xq, yq)
    Q = idx.embed(Xq, yq)
    np.testing.assert_allclose(Q, scale_query(Gq, "grad_cos"), rtol=1e-4, atol=1e-6)
    S_ref = scores(Gq.astype(np.float64), G.astype(np.float64), "grad_cos")
    res = idx.find_similar(Xq, yq, k=5, mode="both")
    np.testing.assert_array_equal(res.ids, np.argsort(-S_ref, 1)[:, :5])
    np.testing.assert_allclose(res.scores, np.sort(S_ref, 1)[:, ::-1][:, :5], atol=1e-4)
    np.testing.assert_array_equal(res.least_ids, np.argsort(S_ref, 1)[:, :5])
    np.testing.assert_allclose(res.least_scores, np.sort(S_ref, 1)[:, :5], atol=1e-4)
    # label filter: only class-3 examples, best first
    f = idx.find_similar(Xq, yq, k=3, labels=[3])
    m = y == 3
    np.testing.assert_array_equal(f.ids, np.flatnonzero(m)[np.argsort(-S_ref[:, m], 1)[:, :3]])
    ex = idx.get_examples([7, 2])
    assert [e["id"] for e in ex] == [7, 2] and np.array_equal(ex[0]["payload"], X[7]) and ex[1]["label"] == str(y[2])
    with pytest.raises(NotFound):
        idx.get_examples([150])
    with pytest.raises(ValueError, match="shape"):
        idx.embed(X[0])
    top = idx.self_influence_top(3)
    assert [t["id"] for t in top] == list(np.argsort(-(G.astype(np.float64) ** 2).sum(1))[:3])
    info = idx.describe()
    assert info.input_shape == [1, 8, 8] and info.kernel == "grad_cos" and info.count == 150
    assert [d.name for d in list_indexes(tmp / "wd")] == ["tiny"]
    with pytest.raises(NotFound):
        open_index(tmp / "wd", "nope")


def test_dense_projected_build_equals_projected_loop(tmp_path):
    cfg = write_config(tmp_path, n=100, projection='kind = "dense"\ndim = 64\nseed = 11', chunk_size=32)
    r = build_index(cfg, tmp_path / "wd", progress=False)
    idx = open_index(tmp_path / "wd", "tiny")
    X, y = digits8(100)
    G = loop_grads(load_tiny(tmp_path), CE, X, y)
    cat = Catalog(tmp_path / "wd")
    with cat.session() as s:
        row = s.query(IndexRow).one()
        layout, proj = row.layout, row.projection
    cat.close()
    pr = Projector(ProjectionSpec.from_dict(proj), layout_from_json(layout))
    V, _ = idx.vectors()
    assert r.dim == 64
    np.testing.assert_allclose(V, pr.project_flat(G), rtol=1e-3, atol=1e-5)
    # the query path reproduces the stored embeddings of training examples
    np.testing.assert_allclose(idx.embed(X[:10], y[:10]), V[:10], rtol=1e-5, atol=1e-6)


def test_existing_names_replace_and_versions(tmp_path):
    cfg = write_config(tmp_path, n=40, chunk_size=16)
    wd = tmp_path / "wd"
    r1 = build_index(cfg, wd, progress=False)
    with pytest.raises(FailedPrecondition, match="already exists"):
        build_index(cfg, wd, progress=False)
    r2 = build_index(cfg, wd, progress=False, new_version=True)
    assert (r1.version, r2.version) == (1, 2) and (wd / r1.path).exists() and (wd / r2.path).exists()
    r3 = build_index(cfg, wd, progress=False, replace=True)
    assert r3.version == 3 and not (wd / r1.path).exists() and not (wd / r2.path).exists()
    assert open_index(wd, "tiny").version == 3
    cat = Catalog(wd)
    with cat.session() as s:
        assert [i.version for i in s.query(IndexRow).all()] == [3]
        assert s.query(Example).count() == 40
    cat.close()


def test_model_mismatch_is_refused(tmp_path):
    cfg = write_config(tmp_path, n=30, chunk_size=16)
    build_index(cfg, tmp_path / "wd", progress=False)
    write_model(tmp_path, seed=99)  # the weights change after the build
    with pytest.raises(ModelMismatch, match="rebuild"):
        open_index(tmp_path / "wd", "tiny")
    idx = open_index(tmp_path / "wd", "tiny", load_model=False)  # metadata still served
    with pytest.raises(ModelMismatch):
        idx.embed(digits8(2)[0])


def test_python_iterable_dataset(tmp_path):
    cfg = write_config(tmp_path, n=50, chunk_size=16)
    X, y = digits8(50)
    batches = [(X[i:i + 7], y[i:i + 7]) for i in range(0, 50, 7)]  # uneven batches, re-chunked to 16
    build_index(cfg, tmp_path / "wd", dataset=batches, progress=False)
    ref = build_index(cfg, tmp_path / "wd2", progress=False)
    a, _ = open_index(tmp_path / "wd", "tiny").vectors()
    b, _ = open_index(tmp_path / "wd2", "tiny").vectors()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert ref.count == 50


def test_images_csv_jsonl_npy_formats(tmp_path):
    from PIL import Image

    write_model(tmp_path)
    X, y = digits8(24)
    for i in range(24):
        d = tmp_path / "imgs" / str(y[i])
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((X[i, 0] * 255).round().astype(np.uint8)).save(d / f"{i:03d}.png")
    cfg = write_config(tmp_path, name="img", data='[data]\nformat = "images"\npath = "imgs"\nmode = "L"\n',
                       extra_model='class_names = ["0","1","2","3","4","5","6","7","8","9"]')
    r = build_index(cfg, tmp_path / "wd", progress=False)
    idx = open_index(tmp_path / "wd", "img")
    ex = idx.get_examples([0])[0]
    assert r.count == 24 and ex["payload"].shape == (1, 8, 8) and ex["external_id"].endswith(".png")
    np.testing.assert_allclose(idx.embed(ex["payload"][None], [int(ex["label"])]), idx.vectors()[0][:1], rtol=1e-5)

    # CSV: tabular MLP
    write_model(tmp_path, "build_mlp", name="mlp.pt")
    rng = np.random.default_rng(0)
    F = rng.standard_normal((30, 4)).round(3)
    rows = ["a,b,c,d,target"] + [",".join(map(str, f)) + f",{['x', 'y', 'z'][i % 3]}" for i, f in enumerate(F)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    model = ('[model]\nname = "mlp"\nentry = "model.py:build_mlp"\nweights = "mlp.pt"\n'
             'class_names = ["x", "y", "z"]\n')
    cfg = write_config(tmp_path, name="tab", model=model, data='[data]\npath = "t.csv"\nlabel = "target"\n',
                       fname="tab.toml")
    r = build_index(cfg, tmp_path / "wd", progress=False)
    G = loop_grads(load_tiny(tmp_path, "build_mlp", "mlp.pt"), CE, F.astype(np.float32), np.arange(30) % 3)
    np.testing.assert_allclose(open_index(tmp_path / "wd", "tab").vectors()[0], G, rtol=1e-4, atol=1e-6)

    # JSONL text with a preprocess function
    write_model(tmp_path, "build_text", name="text.pt")
    lines = [json.dumps({"text": t, "label": lab}) for t, lab in
             [("good movie", "pos"), ("bad plot", "neg"), ("great cast", "pos"), ("awful", "neg")] * 3]
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    model = ('[model]\nname = "txt"\nentry = "model.py:build_text"\nweights = "text.pt"\n'
             'class_names = ["neg", "pos"]\n')
    cfg = write_config(tmp_path, name="txt", model=model, fname="txt.toml",
                       data='[data]\npath = "t.jsonl"\npreprocess = "model.py:preprocess"\n')
    build_index(cfg, tmp_path / "wd", progress=False)
    t = open_index(tmp_path / "wd", "txt")
    assert str(t.get_examples([1])[0]["payload"]) == "bad plot"
    np.testing.assert_allclose(t.embed(["bad plot"], ["neg"]), t.vectors()[0][1:2], rtol=1e-5)

    # .npy with a labels file
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", y)
    cfg = write_config(tmp_path, name="npy", fname="npy.toml",
                       data='[data]\nformat = "npy"\npath = "X.npy"\nlabels = "y.npy"\n')
    assert build_index(cfg, tmp_path / "wd", progress=False).count == 24


def test_cli_build_and_self_influence(tmp_path, capsys):
    from server.cli import main

    cfg = write_config(tmp_path, n=30, chunk_size=16)
    wd = str(tmp_path / "wd")
    assert main(["build", str(cfg), "--workdir", wd, "--quiet"]) == 0
    assert "30 examples" in capsys.readouterr().out
    assert main(["build", str(cfg), "--workdir", wd, "--quiet"]) == 2
    assert "--replace" in capsys.readouterr().err
    assert main(["self-influence", "tiny", "--top", "3", "--workdir", wd, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    si = [r["self_influence"] for r in rows]
    assert len(rows) == 3 and si == sorted(si, reverse=True)
    assert main(["self-influence", "tiny", "--top", "30", "--workdir", wd, "--json", "--lowest"]) == 0
    low = [r["self_influence"] for r in json.loads(capsys.readouterr().out)]
    assert low == sorted(low) and low[-3:] == sorted(si)  # all 30, ascending: ends with the top 3
    assert main(["self-influence", "nope", "--workdir", wd]) == 2
