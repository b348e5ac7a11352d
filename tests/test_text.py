"""Text models end to end: a local Hugging Face directory (tiny BERT classifier, tiny GPT-2 trained
here on generated / stdlib text), its tokenizer at build and query time, raw-text queries over a real
gRPC server on 127.0.0.1, causal-LM completion influence, and planted near-duplicates."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import grpc
import numpy as np
import pytest


@pytest.fixture(scope="module")
def clf(tmp_path_factory):
    """A tiny BERT sentiment classifier (trained on the spot) and its exact (unprojected) grad_dot index."""
    import torch

    from indexer.build import build_index
    from indexer.text_demo import make_classifier_dir

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("textclf")
    info = make_classifier_dir(root / "model", n_train=60, epochs=2, hidden=16, layers=1, max_length=16)
    cfg = {"model": {"name": "clf", "hf_dir": info["dir"], "hf_kind": "sequence_classification",
                     "class_names": ["negative", "positive"], "text": {"max_length": 16}},
           "data": {"format": "jsonl", "path": info["dir"] + "/train.jsonl", "id_field": "id"},
           "index": {"name": "clf", "kernel": "grad_dot", "faiss": "flat"}, "projection": {"kind": "none"},
           "build": {"chunk_size": 32}}
    build_index(cfg, root / "wd", progress=False)
    return SimpleNamespace(root=root, dir=info["dir"], texts=info["texts"], labels=info["labels"], wd=root / "wd")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny GPT-2 over stdlib docstrings, indexed as 16-token blocks (grad_cos, exact)."""
    import torch

    from indexer.build import build_index
    from indexer.text_demo import make_lm_dir, python_doc_corpus

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("textlm")
    info = make_lm_dir(root / "model", docs=python_doc_corpus(("heapq", "bisect"), max_chars=1500), block_size=16,
                       steps=30, hidden=16, layers=1)
    cfg = {"model": {"name": "lm", "hf_dir": info["dir"], "hf_kind": "causal_lm", "text": {"max_length": 16}},
           "data": {"format": "text", "path": info["dir"] + "/corpus"},
           "index": {"name": "lm", "kernel": "grad_cos", "faiss": "flat"}, "projection": {"kind": "none"},
           "build": {"chunk_size": 32}}
    build_index(cfg, root / "wd", progress=False)
    return SimpleNamespace(root=root, dir=info["dir"], wd=root / "wd")


def test_hf_dir_missing_files_are_named(clf, tmp_path):
    from indexer.config import parse_config
    from indexer.errors import ConfigError

    d = tmp_path / "m"
    shutil.copytree(clf.dir, d)
    cfg = {"model": {"name": "x", "hf_dir": str(d), "hf_kind": "sequence_classification"},
           "data": {"format": "jsonl", "path": str(d / "train.jsonl")}, "index": {"name": "x"}}
    assert parse_config(cfg).model["loss"] == "sequence_classification"
    with pytest.raises(ConfigError, match="hf_kind"):
        parse_config({**cfg, "model": {**cfg["model"], "hf_kind": "masked_lm"}})
    (d / "tokenizer_config.json").unlink()
    with pytest.raises(ConfigError, match="tokenizer_config.json"):
        parse_config(cfg)
    (d / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="model.safetensors"):
        parse_config(cfg)
    (d / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json"):
        parse_config(cfg)


def test_catalog_records_tokenization_and_texts(clf):
    from indexer.query import open_index

    idx = open_index(clf.wd, "clf")
    d = idx.describe()
    assert (d.text["hf_kind"], d.text["max_length"], d.text["truncation"], d.text["inputs"]) == (
        "sequence_classification", 16, True, ["input_ids", "attention_mask"])
    assert d.input_shape == [2, 16] and d.count == len(clf.texts)
    rows = idx.get_examples([0, 5])
    assert [str(r["payload"]) for r in rows] == [clf.texts[0], clf.texts[5]]
    assert [r["label"] for r in rows] == [str(clf.labels[0]), str(clf.labels[5])]


def test_padding_and_batch_composition_do_not_change_a_text(clf):
    from indexer.query import open_index

    idx = open_index(clf.wd, "clf")
    t = "the film was wonderful"
    alone = idx.embed([t])
    mixed = idx.embed(["a much longer text about the plot the acting the ending and the soundtrack " * 3, t,
                       "dull"])[1:2]
    np.testing.assert_allclose(mixed, alone, rtol=1e-5, atol=1e-6 * np.abs(alone).max())


def test_server_text_equals_token_ids_equals_gradient_similarity(clf):
    import torch

    from explainers.similarity import GradientSimilarity
    from indexer.engine.losses import sequence_classification_loss
    from indexer.query import open_index
    from server.app import GradIndexServer
    from server.client import GradIndexClient
    from server.config import ServerConfig

    queries = ["the film was really wonderful", "the plot was dull in every scene"]
    srv = GradIndexServer(ServerConfig(workdir=str(clf.wd), indexes=["clf"], port=0)).start()
    try:
        c = GradIndexClient(f"127.0.0.1:{srv.port}")
        by_text = c.find_similar("clf", texts=queries, k=len(clf.texts), include_data=True)
        idx = open_index(clf.wd, "clf")
        X, _ = idx.text_inputs(queries)
        by_ids = c.find_similar("clf", named_inputs={"input_ids": X[:, 0], "attention_mask": X[:, 1]},
                                k=len(clf.texts))
        np.testing.assert_array_equal(by_text.ids, by_ids.ids)
        np.testing.assert_allclose(by_text.scores, by_ids.scores, rtol=1e-5)
        # The neighbours' texts travel with the hits.
        assert by_text.most.texts[0][0] == clf.texts[by_text.ids[0, 0]]
        # The peer computation: alibi-style GradientSimilarity on the same served model, every training text.
        model = idx.model()
        gs = GradientSimilarity(model, sequence_classification_loss(), sim_fn="grad_dot", backend="pytorch",
                                n_examples=len(clf.texts))
        Xtr, _ = idx.text_inputs(clf.texts)
        gs.fit(Xtr, clf.labels)
        with torch.no_grad():
            preds = model(torch.as_tensor(X)).argmax(1).numpy()
        exp = gs.explain(X, preds)
        ref = np.take_along_axis(exp.data["scores"], np.argsort(exp.data["ordered_indices"], axis=1), axis=1)
        got = np.take_along_axis(ref, by_text.ids, axis=1)
        np.testing.assert_allclose(by_text.scores, got, rtol=2e-4, atol=1e-5 * np.abs(ref).max())
        np.testing.assert_array_equal(by_text.targets, preds)
    finally:
        srv.stop(0)


def test_bad_text_requests_are_invalid_argument_and_server_keeps_serving(clf, lm, tmp_path):
    from server.app import GradIndexServer
    from server.client import GradIndexClient
    from server.config import ServerConfig
    from server.demo import ensure_digits_index

    digits = ensure_digits_index(tmp_path, n=24, progress=False)
    # One server per workdir: the classifier, a numeric (digits) index, the LM.
    srv = GradIndexServer(ServerConfig(workdir=str(clf.wd), indexes=["clf"], port=0)).start()
    srv2 = GradIndexServer(ServerConfig(workdir=str(tmp_path), indexes=[digits], port=0)).start()
    srv3 = GradIndexServer(ServerConfig(workdir=str(lm.wd), indexes=["lm"], port=0)).start()
    try:
        c = GradIndexClient(f"127.0.0.1:{srv.port}")
        stub = c.stub
        from server.protos import service_pb2 as pb

        def code(req, s=stub):
            with pytest.raises(grpc.RpcError) as e:
                s.FindSimilar(req)
            return e.value.code(), e.value.details()

        cases = [pb.FindSimilarRequest(index="clf", k=3, texts=["  "]),
                 pb.FindSimilarRequest(index="clf", k=3, texts=["x " * 60_000]),
                 pb.FindSimilarRequest(index="clf", k=3, texts=["fine"], completions=["wrong kind"]),
                 pb.FindSimilarRequest(index="clf", k=3, completions=["no prompt"])]
        for req in cases:
            got, msg = code(req)
            assert got == grpc.StatusCode.INVALID_ARGUMENT and msg, msg
        req = pb.FindSimilarRequest(index="clf", k=3)
        req.named_inputs["input_ids"].CopyFrom(__import__("server.tensors", fromlist=["to_tensor"]).to_tensor(
            np.zeros((1, 7), np.int64)))
        got, msg = code(req)
        assert got == grpc.StatusCode.INVALID_ARGUMENT and "attention_mask" in msg
        # A model without a tokenizer: texts are refused with a message saying what to send.
        got, msg = code(pb.FindSimilarRequest(index=digits, k=3, texts=["a digit"]),
                        GradIndexClient(f"127.0.0.1:{srv2.port}").stub)
        assert got == grpc.StatusCode.INVALID_ARGUMENT and "Tensor" in msg
        # A causal LM: a pair longer than max_length is refused (cutting it would change the question).
        got, msg = code(pb.FindSimilarRequest(index="lm", k=3, texts=["heap " * 20], completions=["push"]),
                        GradIndexClient(f"127.0.0.1:{srv3.port}").stub)
        assert got == grpc.StatusCode.INVALID_ARGUMENT and "max_length" in msg
        # Still serving.
        assert c.find_similar("clf", texts=["the cast was superb"], k=2).ids.shape == (1, 2)
    finally:
        srv.stop(0)
        srv2.stop(0)
        srv3.stop(0)


def test_completion_gradient_counts_only_completion_tokens(lm):
    """The query's gradient is the gradient of Hugging Face's own causal-LM loss with the prompt's
    labels masked (the independent reference: the HF model's loss, one example at a time)."""
    import torch

    from indexer.query import open_index

    idx = open_index(lm.wd, "lm")
    prompts, comps = ["return the smallest item", "insert item x in list a"], [" from the heap", " and keep it sorted"]
    X, Y = idx.text_inputs(prompts, comps)
    eng = idx.embedder().engines[0]
    G = eng.grads(X, Y)
    hf = idx.model().hf
    for i in range(len(X)):
        hf.zero_grad()
        ids, mask = torch.as_tensor(X[i:i + 1, 0]), torch.as_tensor(X[i:i + 1, 1])
        hf(input_ids=ids, attention_mask=mask, labels=torch.as_tensor(Y[i:i + 1])).loss.backward()
        P = dict(idx.model().named_parameters())
        ref = np.concatenate([P[n].grad.reshape(-1).numpy() if P[n].grad is not None
                              else np.zeros(P[n].numel(), np.float32) for n in eng.param_names])
        np.testing.assert_allclose(G[i], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
        n_prompt = len(idx.text_encoder().tok(prompts[i], add_special_tokens=False)["input_ids"])
        assert (Y[i, :n_prompt] == -100).all() and (Y[i, n_prompt:] != -100).sum() > 0


def test_planted_near_duplicates_are_their_originals_top_proponent(lm):
    from indexer.query import open_index

    idx = open_index(lm.wd, "lm")
    picks = [1, 4, 9]
    originals = [str(r["payload"]) for r in idx.get_examples(picks)]
    # A near-duplicate: the block's text with its last word dropped (the same tokens, one fewer).
    dups = [" ".join(t.split()[:-1]) for t in originals]
    res = idx.find_similar(dups, k=1)
    assert res.ids[:, 0].tolist() == picks


def test_text_models_default_to_the_measured_projection(clf):
    from indexer.config import parse_config
    from indexer.defaults import TEXT_PROJECTION

    cfg = {"model": {"name": "x", "hf_dir": clf.dir, "hf_kind": "sequence_classification"},
           "data": {"format": "jsonl", "path": clf.dir + "/train.jsonl"}, "index": {"name": "x"}}
    p = parse_config(cfg).projection
    assert (p.kind, p.dim) == (TEXT_PROJECTION["kind"], TEXT_PROJECTION["dim"])
    assert parse_config({**cfg, "projection": {"kind": "none"}}).projection.kind == "none"


def _save_tagger(tmp_path, clf):
    """A random-init 3-label BERT token classifier with the classifier fixture's tokenizer, saved with
    save_pretrained: (transformers, tokenizer, directory)."""
    import torch

    from indexer.text import import_transformers

    tr = import_transformers()
    d = tmp_path / "tagger"
    torch.manual_seed(0)
    tok = tr.AutoTokenizer.from_pretrained(clf.dir, local_files_only=True)
    tr.BertForTokenClassification(tr.BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=32, num_labels=3,
                                                max_position_embeddings=32)).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return tr, tok, d


def test_token_classification_dir_loads_and_matches_hf_loss(clf, tmp_path):
    """A token-classification directory loads through the config; per-token targets from the client give
    the gradient of Hugging Face's own loss, one example at a time."""
    import torch

    from indexer.config import parse_config
    from indexer.embedder import load_engines
    from indexer.text import TextEncoder, TextSpec

    tr, tok, d = _save_tagger(tmp_path, clf)
    cfg = parse_config({"model": {"name": "t", "hf_dir": str(d), "hf_kind": "token_classification",
                                  "text": {"max_length": 12}},
                        "data": {"format": "jsonl", "path": clf.dir + "/train.jsonl"}, "index": {"name": "t"}})
    eng = load_engines(cfg)[0]
    X = TextEncoder(d, TextSpec("token_classification", 12)).encode(["the film was wonderful", "dull"])
    rng = np.random.default_rng(0)
    Y = np.where(X[:, 1] > 0, rng.integers(0, 3, X[:, 0].shape), -100)
    G = eng.grads(X, Y)
    hf = eng.model.hf
    for i in range(2):
        hf.zero_grad()
        hf(input_ids=torch.as_tensor(X[i:i + 1, 0]), attention_mask=torch.as_tensor(X[i:i + 1, 1]),
           labels=torch.as_tensor(Y[i:i + 1])).loss.backward()
        P = dict(eng.model.named_parameters())
        ref = np.concatenate([P[n].grad.reshape(-1).numpy() if P[n].grad is not None else np.zeros(P[n].numel())
                              for n in eng.param_names])
        np.testing.assert_allclose(G[i], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_ghost_norms_of_sequence_blocks_equal_formed_gradients():
    """Self-influence norms of a sequence block come from its factors (a Linear's gradient is never
    formed for them) and equal the norms of the formed gradients: a Linear with bias, an embedding."""
    from indexer.engine.base import Block
    from indexer.projection import ghost_sq_norms

    rng = np.random.default_rng(0)
    n, L, din, dout, vocab = 3, 8, 40, 48, 50
    lin = Block("lin", "outer", [("w", dout * din), ("b", dout)], a_in=rng.normal(size=(n, L, din)).astype(np.float32),
                d=rng.normal(size=(n, L, dout)).astype(np.float32), has_bias=True)
    idx = rng.integers(0, vocab, size=(n, L))
    idx[:, :3] = idx[:, 3:6]  # repeated tokens: their rows of the gradient add up
    emb = Block("emb", "outer", [("e", vocab * dout)], d=rng.normal(size=(n, L, dout)).astype(np.float32),
                idx=idx, vocab=vocab)
    for blk in (lin, emb):
        g = ghost_sq_norms(blk)
        assert g is not None
        m = blk.materialize().astype(np.float64)
        np.testing.assert_allclose(g, np.einsum("ij,ij->i", m, m), rtol=1e-5)
    # Where forming is cheaper (short sequences of narrow layers) it declines.
    assert ghost_sq_norms(Block("s", "outer", [("w", 4)], a_in=np.ones((1, 8, 2), np.float32),
                                d=np.ones((1, 8, 2), np.float32))) is None


def test_ghost_norms_skip_positions_without_gradient():
    """Masked padding has zero output gradients: those positions are dropped, so a padded sequence
    of a few real tokens takes the ghost form (the gradient is not formed) and still equals the
    formed gradient's norm."""
    from indexer.engine.base import Block
    from indexer.projection import ghost_sq_norms

    rng = np.random.default_rng(1)
    n, L, din, dout = 4, 64, 12, 10
    d = rng.normal(size=(n, L, dout)).astype(np.float32)
    d[:, 5:] = 0.0  # padding
    d[0, 2] = 0.0  # a zero row inside the real tokens counts as nothing either
    blk = Block("lin", "outer", [("w", dout * din), ("b", dout)], a_in=rng.normal(size=(n, L, din)).astype(np.float32),
                d=d, has_bias=True)
    g = ghost_sq_norms(blk)
    assert g is not None  # 64 positions would have formed it (64·23 >= 13·10); 5 live ones do not
    m = blk.materialize().astype(np.float64)
    np.testing.assert_allclose(g, np.einsum("ij,ij->i", m, m), rtol=1e-5)
    blk0 = Block("z", "outer", [("w", dout * din)], a_in=np.ones((2, L, din), np.float32),
                 d=np.zeros((2, L, dout), np.float32))
    np.testing.assert_array_equal(ghost_sq_norms(blk0), [0.0, 0.0])


def test_projector_keeps_small_block_rows_and_factors_bit_identical(monkeypatch):
    """A factored projector whose whole dense matrix does not fit its cache keeps each block's
    factors and the dense-row slices of its small blocks after the first chunk (generated once per
    build, not per chunk), with bit-identical projections to a projector that keeps everything and
    to one that keeps nothing."""
    import indexer.projection as proj
    from indexer.engine.base import Block

    rng = np.random.default_rng(2)
    n, L = 3, 6

    def chunk():
        big = Block("big", "outer", [("w", 48 * 40), ("b", 48)], a_in=rng.normal(size=(n, L, 40)).astype(np.float32),
                    d=rng.normal(size=(n, L, 48)).astype(np.float32), has_bias=True)
        norm = Block("norm", "full", [("nw", 40), ("nb", 40)], full=rng.normal(size=(n, 80)).astype(np.float32))
        small = Block("small", "outer", [("s", 3 * 5)], a_in=rng.normal(size=(n, L, 5)).astype(np.float32),
                      d=rng.normal(size=(n, L, 3)).astype(np.float32))
        return [big, norm, small]

    blocks = chunk()
    offs = {"w": 0, "b": 1920, "nw": 1968, "nb": 2008, "s": 2048}
    layout = proj.layout_of(blocks, offs)
    spec = proj.ProjectionSpec(kind="factored", dim=64, block_rows=512)
    everything = proj.Projector(spec, layout, cache_bytes=1 << 30)
    nothing = proj.Projector(spec, layout, cache_bytes=0)
    budget = proj.Projector(spec, layout, cache_bytes=200_000)  # < the dense matrix (2063 x 64 x 4 bytes)
    assert everything._fits() and not budget._fits()
    calls = []
    real = proj.random_matrix
    monkeypatch.setattr(proj, "random_matrix", lambda *a: calls.append(a) or real(*a))
    ref = everything.project(blocks)
    np.testing.assert_array_equal(nothing.project(blocks), ref)
    np.testing.assert_array_equal(budget.project(blocks), ref)
    calls.clear()
    blocks2 = chunk()
    np.testing.assert_array_equal(budget.project(blocks2), everything.project(blocks2))
    assert calls == []  # the second chunk regenerated nothing
    assert nothing.project(blocks2) is not None and calls  # without a budget they are regenerated


def test_query_padding_is_trimmed_only_after_warm_up_proves_it_exact(clf, lm):
    """A served query runs the model at its texts' real length, not max_length, once warm_up found
    the trimmed and the padded paths equal; its vectors equal the padded path's (classifier and
    causal LM with a completion), and the cut keeps every position a label uses."""
    from indexer.query import open_index
    from indexer.text import IGNORE

    texts = ["the film was really wonderful", "dull", "the plot the acting and the ending were all superb"]
    cold = open_index(clf.wd, "clf")
    warm = open_index(clf.wd, "clf")
    warm.warm_up()
    assert warm._trim_ok and not cold._trim_ok
    X, _ = warm.text_inputs(texts)
    Xt, _ = warm._trimmed(X)
    T = X.shape[2]
    assert Xt.shape[2] < T and Xt.shape[2] == int(X[:, 1].sum(1).max())
    np.testing.assert_array_equal(warm.predict_targets(X), cold.predict_targets(X))
    for batch in (texts, texts[1:2]):
        a, b = warm.embed(batch), cold.embed(batch)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())
    # Per-token labels past the attention mask keep their positions.
    enc = warm.text_encoder()
    Y = np.full((1, T), IGNORE)
    Y[0, T - 2] = 3
    Xc, Yc = enc.trim_padding(X[1:2], Y)
    assert Xc.shape[2] == T - 1 and Yc.shape == (1, T - 1) and Yc[0, -1] == 3
    # Without an attention mask nothing is cut.
    from dataclasses import replace

    enc2 = type(enc).__new__(type(enc))
    enc2.__dict__.update(enc.__dict__, spec=replace(enc.spec, inputs=("input_ids",)))
    assert enc2.trim_padding(X[:, :1])[0].shape == X[:, :1].shape
    # Causal LM: prompt + completion, only the completion's tokens count.
    lw, lc = open_index(lm.wd, "lm"), open_index(lm.wd, "lm")
    lw.warm_up()
    assert lw._trim_ok
    Xq, Yq = lw.text_inputs(["Return the"], [" smallest item"])
    a, b = lw.embed(Xq, Yq), lc.embed(Xq, Yq)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())


def test_token_classification_build_from_word_labels_matches_per_example_loop(clf, tmp_path):
    """A token-classification index built from JSONL words + per-word labels: each word's label sits on
    its first sub-token (the tokenizer's word_ids), -100 elsewhere and on words marked -100, and the
    stored gradients equal Hugging Face's own loss differentiated one example at a time."""
    import json

    import torch

    from indexer.build import build_index
    from indexer.config import parse_config
    from indexer.errors import ConfigError
    from indexer.query import open_index

    tr, tok, d = _save_tagger(tmp_path, clf)
    recs = [{"id": "a", "tokens": ["the", "film", "was", "wonderful"], "labels": ["O", "NOUN", "O", "ADJ"]},
            {"id": "b", "tokens": ["dull"], "labels": ["ADJ"]},
            {"id": "c", "tokens": ["the", "plot", "was", "dull", "and", "slow"], "labels": [0, 1, -100, 2, 0, 2]}]
    data = tmp_path / "tags.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    names = ["O", "NOUN", "ADJ"]
    cfg = {"model": {"name": "tag", "hf_dir": str(d), "hf_kind": "token_classification", "class_names": names,
                     "text": {"max_length": 8}},
           "data": {"format": "jsonl", "path": str(data), "id_field": "id"},
           "index": {"name": "tag", "kernel": "grad_dot", "faiss": "flat"}, "projection": {"kind": "none"},
           "build": {"chunk_size": 2}}
    build_index(cfg, tmp_path / "wd", progress=False)
    idx = open_index(tmp_path / "wd", "tag")
    V, ids = idx.vectors()
    eng = idx.embedder().engines[0]
    hf = eng.model.hf
    for i, r in enumerate(recs):
        # the reference alignment, by hand: [CLS] w1 ... wn [SEP], one token per word with this vocabulary
        lab = [names.index(v) if isinstance(v, str) else v for v in r["labels"]]
        ids_ = tok(" ".join(r["tokens"]), truncation=True, max_length=8)["input_ids"]
        y = np.full(8, -100)
        y[1:len(ids_) - 1] = lab  # every example fits max_length = 8 here
        x = np.full(8, tok.pad_token_id)
        x[:len(ids_)] = ids_
        m = (np.arange(8) < len(ids_)).astype(np.int64)
        hf.zero_grad()
        hf(input_ids=torch.as_tensor(x[None]), attention_mask=torch.as_tensor(m[None]),
           labels=torch.as_tensor(y[None])).loss.backward()
        P = dict(eng.model.named_parameters())
        ref = np.concatenate([P[n].grad.reshape(-1).numpy() if P[n].grad is not None else np.zeros(P[n].numel())
                              for n in eng.param_names])
        np.testing.assert_allclose(V[list(ids).index(i)], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    assert idx.get_examples([2])[0]["payload"] == "the plot was dull and slow"
    # Query targets predicted at every position (padding included) make the trimmed path differ:
    # warm-up's check catches it and keeps this index's queries padded.
    with pytest.warns(RuntimeWarning, match="full max_length"):
        idx.warm_up()
    assert not idx._trim_ok
    # Bad rows are named.
    data.write_text(json.dumps({"tokens": ["a", "b"], "labels": ["O"]}) + "\n")
    with pytest.raises(ConfigError, match="one label per word"):
        build_index({**cfg, "index": {**cfg["index"], "name": "tag2"}}, tmp_path / "wd2", progress=False)
    data.write_text(json.dumps({"tokens": ["the"], "labels": ["VERB"]}) + "\n")
    with pytest.raises(ConfigError, match="VERB"):
        build_index({**cfg, "index": {**cfg["index"], "name": "tag3"}}, tmp_path / "wd3", progress=False)
    assert parse_config(cfg).model["hf_kind"] == "token_classification"
