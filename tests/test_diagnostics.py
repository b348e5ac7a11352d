"""Influence diagnostics: TracIn proponents/opponents against a brute-force loop over checkpoints,
self-influence as a mislabel detector on a tiny problem with planted flips, the unsupervised (VAE)
path, the helpers against hand-computed cases, and `gradindex proponents` over a built index."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from indexer.influence import (TracIn, identical_class_rate, index_self_influence_ranking, mislabel_auc,
                              precision_at_k, ranking, self_proponent_rate, vae_tracin)

torch.set_num_threads(1)
CE = torch.nn.CrossEntropyLoss()


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).eval()


def _loop(model, loss_one, X, Y=None) -> np.ndarray:
    """Independent reference: one autograd backward per example, flat gradient in parameter order."""
    rows = []
    for i in range(len(X)):
        model.zero_grad()
        x = torch.as_tensor(X[i:i + 1])
        out = model(x)
        loss = loss_one(out, None if Y is None else torch.as_tensor(Y[i:i + 1]))
        grads = torch.autograd.grad(loss, [p for p in model.parameters()])
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double().numpy())
    return np.stack(rows)


def test_tracin_scores_proponents_opponents_vs_loop_over_checkpoints():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 4)).astype(np.float32)
    y = rng.integers(0, 3, 30)
    Xq = rng.normal(size=(4, 4)).astype(np.float32)
    models, lrs = [_mlp(s) for s in (1, 2, 3)], [0.5, 0.25, 0.125]
    tr = TracIn(models, lrs, CE, task="classification", chunk_size=7)  # several chunks
    yq = models[-1](torch.as_tensor(Xq)).argmax(1).numpy()  # unlabeled queries: last checkpoint's class
    ref = sum(lr * _loop(m, CE, Xq, yq) @ _loop(m, CE, X, y).T for m, lr in zip(models, lrs))
    S = tr.scores(Xq, X, None, y)
    np.testing.assert_allclose(S, ref, rtol=1e-4, atol=1e-7)
    inf = tr.influence(Xq, X, None, y, k=5)
    np.testing.assert_array_equal(inf.proponent_ids, np.argsort(-ref, 1, kind="stable")[:, :5])
    np.testing.assert_array_equal(inf.opponent_ids, np.argsort(ref, 1, kind="stable")[:, :5])
    assert np.all(inf.proponent_scores[:, 0] > 0) and np.all(inf.opponent_scores[:, 0] < 0)
    assert np.all(np.diff(inf.proponent_scores, axis=1) <= 0) and np.all(np.diff(inf.opponent_scores, axis=1) >= 0)
    si_ref = sum(lr * (_loop(m, CE, X, y) ** 2).sum(1) for m, lr in zip(models, lrs))
    np.testing.assert_allclose(tr.self_influence(X, y), si_ref, rtol=1e-4)
    np.testing.assert_allclose(np.diag(tr.gram(X, y)), si_ref, rtol=1e-4)
    ids, s = tr.self_influence_ranking(X, y)
    np.testing.assert_array_equal(ids, np.argsort(-si_ref, kind="stable"))


def test_query_models_give_the_query_side_of_every_score():
    """With query_models, a score is Σ_c lr_c g_c^query(q)·g_c(x): query gradients from the query
    models, training gradients from the checkpoints (a per-example loop on each side)."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(9, 4)).astype(np.float32)
    y = rng.integers(0, 3, 9)
    models, qmodels, lrs = [_mlp(1), _mlp(2)], [_mlp(5), _mlp(6)], [0.5, 0.25]
    tr = TracIn(models, lrs, CE, chunk_size=4, query_models=qmodels)
    ref = sum(lr * _loop(q, CE, X, y) @ _loop(m, CE, X, y).T for m, q, lr in zip(models, qmodels, lrs))
    np.testing.assert_allclose(tr.scores(X, X, y, y), ref, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(tr.gram(X, y), ref, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(tr.self_influence(X, y), np.diag(ref), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="one per checkpoint"):
        TracIn(models, lrs, CE, query_models=qmodels[:1])


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="learning rates"):
        TracIn([_mlp(0), _mlp(1)], [0.1], CE)
    with pytest.raises(ValueError, match="at least one"):
        TracIn([], 0.1, CE)
    with pytest.raises(ValueError, match="> 0"):
        TracIn([_mlp(0)], -1.0, CE)
    with pytest.raises(ValueError, match="k must be"):
        TracIn([_mlp(0)], 0.1, CE).influence(np.zeros((1, 4), np.float32), np.zeros((3, 4), np.float32), k=0)
    with pytest.raises(ValueError, match="both flipped and clean"):
        mislabel_auc([1.0, 2.0], [False, False])
    with pytest.raises(ValueError, match="square"):
        self_proponent_rate(np.zeros((2, 3)))


def test_helpers_hand_computed():
    # scores 3, 2, 1, 0 with ids 0 and 2 flipped: pairs (3>2) (3>0) (1<2) (1>0) -> AUC 3/4
    assert mislabel_auc([3.0, 2.0, 1.0, 0.0], [0, 2]) == pytest.approx(0.75)
    assert mislabel_auc([3.0, 2.0, 1.0, 0.0], np.array([True, False, True, False])) == pytest.approx(0.75)
    assert precision_at_k([3.0, 2.0, 1.0, 0.0], [0, 2]) == pytest.approx(0.5)
    ids, s = ranking([0.5, 2.0, 0.5, -1.0])
    assert ids.tolist() == [1, 0, 2, 3] and s.tolist() == [2.0, 0.5, 0.5, -1.0]
    S = np.array([[3.0, 1.0, 0.0], [4.0, 2.0, 0.0], [1.0, 1.0, 1.0]])  # row 2 ties: a miss
    assert self_proponent_rate(S) == pytest.approx(1 / 3)
    assert identical_class_rate(S, [7, 8, 9], [7, 8, 7]) == pytest.approx(2 / 3)


def test_self_influence_finds_planted_mislabels():
    """Three well-separated blobs, 10% of labels flipped, a linear softmax model trained by SGD with
    checkpoints: the flipped examples carry the largest self-influence."""
    rng = np.random.default_rng(0)
    n = 150
    y = np.repeat(np.arange(3), n // 3)
    centers = np.array([[3.0, 0.0], [-1.5, 2.6], [-1.5, -2.6]])
    X = (centers[y] + rng.normal(scale=0.7, size=(n, 2))).astype(np.float32)
    flip = np.zeros(n, bool)
    flip[rng.choice(n, n // 10, replace=False)] = True
    yf = y.copy()
    yf[flip] = (y[flip] + rng.integers(1, 3, flip.sum())) % 3
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 3)
    lr, ckpts = 0.1, []
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    Xt, Yt = torch.as_tensor(X), torch.as_tensor(yf)
    for epoch in range(30):
        for i in range(0, n, 15):
            opt.zero_grad()
            CE(model(Xt[i:i + 15]), Yt[i:i + 15]).backward()
            opt.step()
        if epoch % 10 == 9:
            m = torch.nn.Linear(2, 3)
            m.load_state_dict(model.state_dict())
            ckpts.append(m.eval())
    si = TracIn(ckpts, lr, CE).self_influence(X, yf)
    assert mislabel_auc(si, flip) > 0.95
    assert precision_at_k(si, flip) >= 0.8
    assert mislabel_auc(-si, flip) < 0.1  # the direction matters: low self-influence = clean


def test_unsupervised_vae_tracin_vs_loop(tmp_path):
    from indexer.vae import VAE, train_vae

    rng = np.random.default_rng(1)
    X = rng.random((24, 1, 4, 4)).astype(np.float32)
    paths = [str(tmp_path / f"v{c}.pt") for c in range(2)]
    train_vae(X, epochs=2, seed=0, checkpoints=paths, hidden=5, latent=2, n_samples=3, batch_size=8)
    tr = vae_tracin(paths, lrs=[0.01, 0.02], chunk_size=10)

    def neg_elbo(out, _):
        return out.sum()  # the model's output is the per-example negative ELBO

    models = []
    for p in paths:
        m = VAE(16, hidden=5, latent=2, n_samples=3)
        m.load_state_dict(torch.load(p, weights_only=True))
        models.append(m.eval())
    G = [_loop(m, neg_elbo, X) for m in models]
    Xq = X[:3] * 0.5
    Gq = [_loop(m, neg_elbo, Xq) for m in models]
    ref = 0.01 * Gq[0] @ G[0].T + 0.02 * Gq[1] @ G[1].T
    np.testing.assert_allclose(tr.scores(Xq, X), ref, rtol=1e-4, atol=1e-8)
    inf = tr.influence(Xq, X, k=3)
    np.testing.assert_array_equal(inf.proponent_ids, np.argsort(-ref, 1, kind="stable")[:, :3])
    np.testing.assert_array_equal(inf.opponent_ids, np.argsort(ref, 1, kind="stable")[:, :3])
    gram = tr.gram(X)
    np.testing.assert_allclose(np.diag(gram), tr.self_influence(X), rtol=1e-6)
    np.testing.assert_allclose(gram, 0.01 * G[0] @ G[0].T + 0.02 * G[1] @ G[1].T, rtol=1e-4, atol=1e-8)
    # more encoder samples: a different (redrawn) noise buffer, still a deterministic loss
    tr64 = vae_tracin(paths, lrs=0.01, n_samples=64, noise_seed=3)
    assert tr64.engines[0].dim == tr.engines[0].dim
    np.testing.assert_allclose(tr64.self_influence(X[:4]), tr64.self_influence(X[:4]), rtol=0)
    # fresh draws for the queries: query gradients from the same weights with noise_seed 7
    trq = vae_tracin(paths, lrs=[0.01, 0.02], chunk_size=10, query_noise_seed=7)
    qmods = []
    for p in paths:
        m = VAE(16, hidden=5, latent=2, n_samples=3, noise_seed=7)
        m.load_state_dict(torch.load(p, weights_only=True))
        qmods.append(m.eval())
    Gq7 = [_loop(m, neg_elbo, X) for m in qmods]
    ref7 = 0.01 * Gq7[0] @ G[0].T + 0.02 * Gq7[1] @ G[1].T
    np.testing.assert_allclose(trq.gram(X), ref7, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(trq.self_influence(X), np.diag(ref7), rtol=1e-4, atol=1e-8)
    assert not np.allclose(ref7, gram, rtol=1e-3)  # other draws, other scores


def test_cli_proponents_and_ranking_over_a_tracin_index(tmp_path, capsys):
    from test_build_support import digits8, load_tiny, write_config, write_model

    from indexer.build import build_index
    from indexer.query import open_index
    from server.cli import build_parser

    lrs = (0.5, 0.125)
    write_model(tmp_path, seed=1, name="ck1.pt")
    write_model(tmp_path, seed=2, name="ck2.pt")
    extra = "\n".join(f'[[model.checkpoints]]\nweights = "ck{i + 1}.pt"\nlearning_rate = {lr}'
                      for i, lr in enumerate(lrs))
    model = '[model]\nname = "tiny"\nentry = "model.py:build_model"\nloss = "cross_entropy"\n' + extra + "\n"
    cfg = write_config(tmp_path, n=40, chunk_size=16, model=model)
    build_index(cfg, tmp_path / "wd", progress=False)
    X, y = digits8(40)
    tr = TracIn([load_tiny(tmp_path, weights=f"ck{i + 1}.pt") for i in range(2)], lrs, CE)
    Xq, yq = X[:2] * 0.8, y[:2]
    ref = tr.influence(Xq, X, yq, y, k=3)
    np.save(tmp_path / "q.npy", Xq)
    np.save(tmp_path / "qy.npy", yq)

    ap = build_parser()
    args = ap.parse_args(["proponents", "tiny", "--input", str(tmp_path / "q.npy"), "--labels",
                          str(tmp_path / "qy.npy"), "--top", "3", "--workdir", str(tmp_path / "wd"), "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert [[h["id"] for h in o["proponents"]] for o in out] == ref.proponent_ids.tolist()
    assert [[h["id"] for h in o["opponents"]] for o in out] == ref.opponent_ids.tolist()
    np.testing.assert_allclose([[h["score"] for h in o["proponents"]] for o in out], ref.proponent_scores,
                               rtol=1e-4)
    # an unknown index: one line, exit status 2
    args = ap.parse_args(["proponents", "nope", "--input", str(tmp_path / "q.npy"), "--workdir", str(tmp_path / "wd")])
    assert args.func(args) == 2 and "error" in capsys.readouterr().err
    # ranking from the catalog: highest and lowest self-influence
    idx = open_index(tmp_path / "wd", "tiny")
    si = tr.self_influence(X, y)
    hi, hs = index_self_influence_ranking(idx, k=5)
    lo, _ = index_self_influence_ranking(idx, k=5, lowest=True)
    idx.close()
    np.testing.assert_array_equal(hi, np.argsort(-si, kind="stable")[:5])
    np.testing.assert_array_equal(lo, np.argsort(si, kind="stable")[:5])
    np.testing.assert_allclose(hs, np.sort(si)[::-1][:5], rtol=1e-4)


def test_vae_example_quick_writes_png(tmp_path, capsys):
    """The unsupervised example end to end (tiny): a PNG and the sanity-check line."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "vae" / "vae_influence.py"
    spec = importlib.util.spec_from_file_location("vae_influence_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "vae.png"
    assert mod.main(["--quick", "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "own strongest proponent" in text and "proponents' labels" in text


def test_gradindex_help_lists_every_subcommand_and_cites_no_outside_document():
    """Every subcommand is registered (statically, from both packages) and no --help text points the
    reader at documents the repository does not hold."""
    import re

    from server.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(sub.choices) == {"build", "self-influence", "proponents", "serve", "query", "demo"}
    texts = [parser.format_help()] + [p.format_help() for p in sub.choices.values()]
    for text in texts:
        assert not re.search(r"DESIGN|§|issue \d|main job", text), text
