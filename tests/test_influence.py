"""Influence: self-influence Σ lr‖g‖² and TracIn over checkpoints as one inner-product index, checked
against a per-example loop; an unsupervised VAE (negative ELBO over encoder samples); the CLI listing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from indexer.build import build_index
from indexer.influence import index_self_influence_ranking, index_self_proponent_rate, tracin_scores
from indexer.query import open_index
from test_build_support import digits8, load_tiny, loop_grads, write_config, write_model

CE = torch.nn.CrossEntropyLoss()
LRS = (0.5, 0.125)


@pytest.fixture(scope="module")
def tracin(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracin")
    write_model(tmp, seed=1, name="ck1.pt")
    write_model(tmp, seed=2, name="ck2.pt")
    extra = "\n".join(f'[[model.checkpoints]]\nweights = "ck{i + 1}.pt"\nlearning_rate = {lr}' for i, lr in enumerate(LRS))
    model = '[model]\nname = "tiny"\nentry = "model.py:build_model"\nloss = "cross_entropy"\n' + extra + "\n"
    cfg = write_config(tmp, n=80, chunk_size=32, model=model)
    build_index(cfg, tmp / "wd", progress=False)
    X, y = digits8(80)
    Gs = [loop_grads(load_tiny(tmp, weights=f"ck{i + 1}.pt"), CE, X, y) for i in range(2)]
    return tmp, X, y, Gs


def test_tracin_index_is_concatenation_of_sqrt_lr_gradients(tracin):
    tmp, X, y, Gs = tracin
    idx = open_index(tmp / "wd", "tiny")
    V, _ = idx.vectors()
    ref = np.hstack([np.sqrt(lr) * G for lr, G in zip(LRS, Gs)])
    np.testing.assert_allclose(V, ref, rtol=1e-4, atol=1e-6)
    si = sum(lr * (G.astype(np.float64) ** 2).sum(1) for lr, G in zip(LRS, Gs))
    rows = idx.get_examples(np.arange(80), payload=False)
    np.testing.assert_allclose([r["self_influence"] for r in rows], si, rtol=1e-4)
    ids, top = index_self_influence_ranking(idx, 5)
    assert ids.tolist() == list(np.argsort(-si)[:5])
    np.testing.assert_allclose(top, np.sort(si)[::-1][:5], rtol=1e-4)


def test_tracin_scores_equal_sum_over_checkpoints(tracin):
    tmp, X, y, Gs = tracin
    idx = open_index(tmp / "wd", "tiny")
    Xq, yq = X[:3] * 0.9, (y[:3] + 1) % 10
    ckpts = [load_tiny(tmp, weights=f"ck{i + 1}.pt") for i in range(2)]
    Gq = [loop_grads(m, CE, Xq, yq) for m in ckpts]
    S = sum(lr * Gq[c].astype(np.float64) @ Gs[c].astype(np.float64).T for c, lr in enumerate(LRS))
    res = tracin_scores(idx, Xq, yq, k=6)
    np.testing.assert_array_equal(res.ids, np.argsort(-S, 1)[:, :6])
    np.testing.assert_allclose(res.scores, np.sort(S, 1)[:, ::-1][:, :6], rtol=1e-4, atol=1e-5)
    opp = tracin_scores(idx, Xq, yq, k=2, mode="least")
    np.testing.assert_array_equal(opp.ids, np.argsort(S, 1)[:, :2])


def test_unsupervised_vae_self_influence(tmp_path):
    write_model(tmp_path, "build_vae", name="vae.pt")
    from indexer.vae import VAE

    X, _ = digits8(60)
    model = ('[model]\nname = "vae"\nentry = "model.py:build_vae"\nweights = "vae.pt"\nloss = "none"\n'
             'task = "unsupervised"\n')
    cfg = write_config(tmp_path, n=60, chunk_size=25, model=model, kernel="grad_dot", name="vae",
                       data='[data]\npath = "digits.npz"\nx = "X"\ny = ""\n')
    cfg.write_text(cfg.read_text().replace('y = ""\n', ""))
    np.savez(tmp_path / "digits.npz", X=X)  # no labels at all
    build_index(cfg, tmp_path / "wd", progress=False)
    vae = load_tiny(tmp_path, "build_vae", "vae.pt")
    assert isinstance(vae, VAE)
    G = loop_grads(vae, None, X, None)  # loss = the model's own output (negative ELBO, 64 encoder samples each)
    idx = open_index(tmp_path / "wd", "vae")
    np.testing.assert_allclose(idx.vectors()[0], G, rtol=1e-4, atol=1e-6)
    si = (G.astype(np.float64) ** 2).sum(1)
    assert [r["id"] for r in idx.self_influence_top(4)] == list(np.argsort(-si)[:4])
    assert idx.get_examples([0])[0]["label"] is None
    # the paper's sanity check on exact gradients: examples are their own strongest proponents
    assert index_self_proponent_rate(idx) >= 0.9


def test_vae_tracin_paper_recipe_matches_per_example_loop(tmp_path):
    """VAE-TracIn as the paper computes it — the paper's layer layout (tiny), beta = 4, the squared-error
    loss, each gradient with its own encoder draws and the queries' independent of the training
    gradients' — equals sum_c lr * <g_c(query), g_c(train)> from one autograd backward per example."""
    from indexer.demo import load_digits_28
    from indexer.influence import load_vae, self_proponent_rate, vae_tracin
    from indexer.vae import paper_hidden, train_vae

    X, _ = load_digits_28(40)
    paths = [str(tmp_path / f"ck{i}.pt") for i in range(2)]
    train_vae(X, epochs=2, seed=0, checkpoints=paths, optimizer="sgd", lr=1e-3, hidden=paper_hidden(2), latent=2,
              beta=4.0, init="kaiming", n_samples=3)
    lr = 1e-3
    tr = vae_tracin(paths, lr, n_samples=3, noise_seed=1, query_noise_seed=2, likelihood="gaussian", chunk_size=7)
    Xq = X[:5]
    S = tr.scores(Xq, X)

    def loop(path, seed, data):
        m = load_vae(path, n_samples=3, noise_seed=seed, likelihood="gaussian")
        params = list(m.parameters())
        rows = []
        for i in range(len(data)):
            g = torch.autograd.grad(m(torch.as_tensor(data[i:i + 1]))[0], params)
            rows.append(torch.cat([t.reshape(-1) for t in g]).double().numpy())
        return np.stack(rows)

    ref = sum(lr * loop(p, 2, Xq) @ loop(p, 1, X).T for p in paths)
    np.testing.assert_allclose(S, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
    # independent draws: the query's own gradient differs from the training one (the self score is
    # not a squared norm), unlike query = training draws
    same = vae_tracin(paths, lr, n_samples=3, noise_seed=1, likelihood="gaussian").scores(Xq, X)
    assert not np.allclose(S[:, :5].diagonal(), same[:, :5].diagonal())
    G1 = sum(lr * loop(p, 1, X) @ loop(p, 1, X).T for p in paths)
    np.testing.assert_allclose(same, G1[:5], rtol=1e-4, atol=1e-6 * np.abs(G1).max())
    assert 0.0 <= self_proponent_rate(G1) <= 1.0
