"""AnchorImage against a model keyed on one patch: the anchor must be that patch's segments."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from explainers.anchors import AnchorImage

FAST = dict(coverage_samples=1000)


def make_image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = (rng.random((28, 28, 1)) * 0.1).astype(np.float32)
    img[0:14, 7:14, 0] = (np.indices((14, 7)).sum(0) % 2).astype(np.float32)  # checkerboard patch
    return img


IMG = make_image()


def grid(image: np.ndarray, size: int = 7) -> np.ndarray:
    """4x4 grid of 7x7 superpixels; labels start at 1 on purpose (must be renumbered)."""
    r, c = np.indices(image.shape[:2])
    return (r // size) * (image.shape[1] // size) + c // size + 1


def keyed(X: np.ndarray) -> np.ndarray:
    """1 iff the patch rows 0-13, cols 7-13 is textured in both of its grid cells."""
    a = X[:, 0:7, 7:14, 0].std(axis=(1, 2))
    b = X[:, 7:14, 7:14, 0].std(axis=(1, 2))
    return ((a > 0.3) & (b > 0.3)).astype(np.int64)


def fresh_precision(segments: np.ndarray, anchor: list[int], p: float = 0.5, n: int = 1000, seed: int = 5) -> float:
    """Independent re-measurement: mean-fill each non-anchor superpixel w.p. p, per-sample loop."""
    rng = np.random.default_rng(seed)
    label = keyed(IMG[None])[0]
    out = []
    for _ in range(n):
        img = IMG.copy()
        for s in np.unique(segments):
            if s in anchor or rng.random() >= p:
                continue
            m = segments == s
            img[m] = IMG[m].mean()
        out.append(img)
    return float(np.mean(keyed(np.stack(out)) == label))


def test_patch_segments_custom_grid() -> None:
    ex = AnchorImage(keyed, IMG.shape, segmentation_fn=grid, seed=0)
    exp = ex.explain(IMG, **FAST)
    segs = exp.segments
    assert segs.min() == 0 and segs.max() == 15  # renumbered from 1..16
    want = sorted({int(segs[3, 10]), int(segs[10, 10])})
    assert sorted(exp.raw["feature"]) == want == [1, 5]
    assert exp.precision == 1.0 and exp.raw["success"]
    assert abs(exp.coverage - 0.25) < 0.05
    assert fresh_precision(segs, exp.raw["feature"]) >= 0.95 - 0.05
    # masked image: anchor superpixels visible (scaled to 0..255), everything else 0
    masked = exp.anchor
    assert masked.shape == IMG.shape and masked.dtype.kind == "i"
    inside = np.isin(segs, want)
    assert np.all(masked[~inside] == 0) and masked[inside].max() == 255


def test_background_images_and_p_sample() -> None:
    bg = np.zeros((3,) + IMG.shape, dtype=np.float32)
    ex = AnchorImage(keyed, IMG.shape, segmentation_fn=grid, images_background=bg, seed=1)
    exp = ex.explain(IMG, p_sample=0.8, **FAST)
    assert sorted(exp.raw["feature"]) == [1, 5]
    assert abs(exp.coverage - 0.2 ** 2) < 0.03  # coverage under p_sample: both kept w.p. 0.2 each
    # perturbed superpixels come from the background (zeros)
    for step in exp.raw["examples"]:
        for img in step["covered_false"]:
            assert img.min() == 0


def test_slic_start_label_every_superpixel_perturbed() -> None:
    """alibi #748: with slic's start_label=1 one superpixel was never perturbed. Here every one is."""
    ex = AnchorImage(keyed, IMG.shape, segmentation_fn="slic",
                     segmentation_kwargs={"n_segments": 12, "compactness": 10, "sigma": 0.5, "start_label": 1})
    segs = ex.generate_superpixels(IMG)
    k = len(np.unique(segs))
    assert segs.min() == 0 and segs.max() == k - 1
    from explainers.anchors.image import ImageSampler

    sampler = ImageSampler(IMG, segs, 1, ex.predictor, 0.5, None)
    batch, keep = sampler.perturb((), 400, np.random.default_rng(0))
    raw = sampler.images(batch)
    assert keep.shape == (400, k) and np.all((~keep).any(axis=0)), "every superpixel must be perturbed sometimes"
    # the perturbed pixels equal their superpixel mean, the others the image
    for i in range(5):
        for s in range(k):
            m = segs == s
            want = IMG[m] if keep[i, s] else np.full(m.sum(), IMG[m].mean(), dtype=np.float32)[:, None]
            np.testing.assert_allclose(raw[i][m], want.reshape(raw[i][m].shape), rtol=1e-5)


@pytest.mark.parametrize("fn,kwargs", [("felzenszwalb", {"scale": 50}), ("quickshift", {"kernel_size": 3, "max_dist": 6}),
                                       ("slic", None)])
def test_builtin_segmentations(fn: str, kwargs: dict | None) -> None:
    ex = AnchorImage(keyed, IMG.shape, segmentation_fn=fn, segmentation_kwargs=kwargs, seed=0)
    exp = ex.explain(IMG, **FAST)
    segs = exp.segments
    assert segs.shape == IMG.shape[:2] and segs.min() == 0
    assert exp.precision >= 0.95 - 0.05 or not exp.raw["success"]
    if exp.raw["success"]:
        assert fresh_precision(segs, exp.raw["feature"]) >= 0.95 - 0.05


def test_same_seed_threads_and_proba() -> None:
    def proba(X: np.ndarray) -> np.ndarray:
        y = keyed(X)
        return np.column_stack([1 - y, y]).astype(np.float32)

    ex = AnchorImage(proba, IMG.shape, segmentation_fn=grid, predictor_type="proba")
    seq = [ex.explain(IMG, seed=s, **FAST) for s in range(3)]
    par: list = [None] * 3

    def work(i: int) -> None:
        par[i] = ex.explain(IMG, seed=i, **FAST)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for a, b in zip(seq, par):
        assert a.raw["feature"] == b.raw["feature"] and a.precision == b.precision
        assert a.raw["num_preds"] == b.raw["num_preds"]
        assert sorted(a.raw["feature"]) == [1, 5]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="segmentation_fn"):
        AnchorImage(keyed, IMG.shape, segmentation_fn="watershed")
    with pytest.raises(ValueError, match="images_background"):
        AnchorImage(keyed, IMG.shape, images_background=np.zeros((2, 5, 5, 1)))
    ex = AnchorImage(keyed, IMG.shape, segmentation_fn=grid)
    with pytest.raises(ValueError, match="shape"):
        ex.explain(IMG[:, :20])
    with pytest.raises(ValueError, match="p_sample"):
        ex.explain(IMG, p_sample=1.5)


def test_lucb_arms_auto_is_the_paper_rule_for_images() -> None:
    """'auto' (the default) samples the two critical arms per KL-LUCB round for images: identical
    to lucb_arms=2 (same anchor, same number of predictor rows), and fewer rows than every blocking arm."""
    ex = AnchorImage(keyed, IMG.shape, segmentation_fn=grid, seed=0)
    rows = {}
    for arms in ("auto", 2, None):
        before = ex.predictor.rows
        exp = ex.explain(IMG, lucb_arms=arms, **FAST)
        rows[arms] = ex.predictor.rows - before
        assert sorted(exp.raw["feature"]) == [1, 5]
    assert rows["auto"] == rows[2] <= rows[None]
    with pytest.raises(ValueError, match="lucb_arms"):
        ex.explain(IMG, lucb_arms="all")


class ImageLog:
    """``keyed`` that records every image it is given (as bytes), to check none is labelled twice."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def __call__(self, X: np.ndarray) -> np.ndarray:
        self.seen.extend(np.ascontiguousarray(x).tobytes() for x in X)
        return keyed(X)


@pytest.mark.parametrize("background", [False, True])
def test_label_cache_same_explanation_and_no_image_labelled_twice(background: bool) -> None:
    """The label cache changes nothing but the predictor's work: same anchor, trace and examples as
    labelling every draw; no masked image is sent to the predictor twice; fewer rows labelled."""
    # blank areas: superpixels the replacement leaves unchanged (black on a black background, or
    # uniform cells whose mean is themselves) make different masks the same image
    img = IMG.copy()
    img[14:, :, 0] = 0.0
    bg = np.stack([np.zeros_like(img), np.full_like(img, 0.5)]) if background else None
    exps, logs = {}, {}
    for cache in (False, True):
        logs[cache] = ImageLog()
        ex = AnchorImage(logs[cache], img.shape, segmentation_fn=grid, images_background=bg, predictor_type="class")
        exps[cache] = ex.explain(img, seed=3, cache_labels=cache, **FAST)
    a, b = exps[False], exps[True]
    assert sorted(b.raw["feature"]) == [1, 5]
    assert a.raw["feature"] == b.raw["feature"] and a.precision == b.precision and a.coverage == b.coverage
    assert a.raw["precision"] == b.raw["precision"] and a.raw["num_preds"] == b.raw["num_preds"]
    for ea, eb in zip(a.raw["examples"], b.raw["examples"]):
        for k in ("covered_true", "covered_false"):
            np.testing.assert_array_equal(np.asarray(ea[k]), np.asarray(eb[k]))
    seen = logs[True].seen[1:]  # [0] is the instance itself, labelled before the search
    assert len(seen) == len(set(seen)), "a masked image was labelled twice"
    assert b.raw["labelled"] == len(seen) < a.raw["labelled"] == len(logs[False].seen) - 1
    # without a background the 8 cells of the lower half are uniform black, their own mean: only the 8
    # upper cells change the image, so at most 2**8 distinct images
    if not background:
        assert b.raw["labelled"] <= 2 ** 8 < a.raw["labelled"] / 4


def test_shared_draws_give_every_arm_samples_from_its_own_distribution() -> None:
    """Every sample counted for an anchor must be a draw from that anchor's distribution: its
    superpixels kept, every other superpixel kept independently with probability 1 - p_sample.
    Counting a sibling's draws (whose own superpixel is forced) would push that superpixel's keep
    rate towards 1, which this checks for every candidate of the search and every superpixel."""
    from explainers.anchors.base import AnchorSearch, Predictor
    from explainers.anchors.image import ImageSampler

    segs = grid(IMG) - 1
    for p_sample in (0.5, 0.3):
        sampler = ImageSampler(IMG, segs, 1, Predictor(keyed), p_sample, None)
        search = AnchorSearch(sampler, np.random.default_rng(0), lucb_arms=2)
        assert search.shared
        res = search.anchor_beam(coverage_samples=1000)
        assert sorted(res["feature"]) == [1, 5]
        checked = 0
        for anchor in list(search.t_nsamples):
            rows = search._idx(anchor)
            if len(rows) < 100:
                continue
            kept = search.data[rows]
            assert kept[:, list(anchor)].all()
            free = [f for f in range(16) if f not in anchor]
            rates = kept[:, free].mean(axis=0)
            tol = 4 * np.sqrt(p_sample * (1 - p_sample) / len(rows))
            assert np.all(np.abs(rates - (1 - p_sample)) < tol), (anchor, len(rows), rates.round(3))
            checked += 1
        assert checked >= 5
    # shared draws are refused when free superpixels are rarely kept (a parent's draws would rarely reach a child)
    assert not AnchorSearch(ImageSampler(IMG, segs, 1, Predictor(keyed), 0.8, None), np.random.default_rng(0)).shared


def test_shared_draws_same_anchor_fewer_rows() -> None:
    rows = {}
    for share in (False, True):
        ex = AnchorImage(keyed, IMG.shape, segmentation_fn=grid, predictor_type="class")
        exp = ex.explain(IMG, seed=2, share_draws=share, **FAST)
        assert sorted(exp.raw["feature"]) == [1, 5] and exp.precision >= 0.95
        assert fresh_precision(exp.segments, exp.raw["feature"]) >= 0.95 - 0.05
        rows[share] = exp.raw["labelled"]
    assert rows[True] < rows[False]


class CallLog:
    """``keyed`` that records the number of rows of every call."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, X: np.ndarray) -> np.ndarray:
        self.sizes.append(len(X))
        return keyed(X)


def test_predict_batch_size_groups_rows_and_changes_nothing_else() -> None:
    """Rows per predictor call are capped (default: batch_size, the rows alibi sends per call); the anchor,
    its trace and the images labelled are the same whatever the cap."""
    exps, logs = {}, {}
    for cap, batch in (("auto", 100), (None, 100), (7, 100), ("auto", 40)):
        logs[cap, batch] = CallLog()
        ex = AnchorImage(logs[cap, batch], IMG.shape, segmentation_fn=grid, predictor_type="class")
        exps[cap, batch] = ex.explain(IMG, seed=4, predict_batch_size=cap, batch_size=batch, **FAST)
    ref = exps["auto", 100]
    assert sorted(ref.raw["feature"]) == [1, 5]
    for key in (("auto", 100), (None, 100), (7, 100)):
        e = exps[key]
        assert e.raw["feature"] == ref.raw["feature"] and e.raw["precision"] == ref.raw["precision"]
        assert e.raw["labelled"] == ref.raw["labelled"] == sum(logs[key].sizes) - 1  # [0]: the instance
        assert e.meta["params"]["predict_batch_size"] == key[0]
    assert max(logs["auto", 100].sizes) <= 100 < max(logs[None, 100].sizes)  # shared draws label ~2 x batch_size
    assert max(logs[7, 100].sizes) <= 7
    assert max(logs["auto", 40].sizes) <= 40
    ex = AnchorImage(keyed, IMG.shape, segmentation_fn=grid, predictor_type="class")
    for bad in (0, -3, 2.5, True, "big"):
        with pytest.raises(ValueError, match="predict_batch_size"):
            ex.explain(IMG, predict_batch_size=bad, **FAST)


class SizeCost:
    """``keyed``, with a real cost per row that depends on the call's size (time.sleep), as a model whose
    buffers outgrow a cache or an allocator threshold: ``slow`` s per row in calls above ``cut`` rows,
    ``fast`` s per row up to it, plus ``per_call`` s per call."""

    def __init__(self, cut: int, slow: float, fast: float, per_call: float = 0.0) -> None:
        self.cut, self.slow, self.fast, self.per_call = cut, slow, fast, per_call
        self.sizes: list[int] = []

    def __call__(self, X: np.ndarray) -> np.ndarray:
        self.sizes.append(len(X))
        time.sleep(self.per_call + len(X) * (self.slow if len(X) > self.cut else self.fast))
        return keyed(X)


def explain_until_calibrated(pred: SizeCost, batch: int) -> tuple[AnchorImage, list]:
    ex = AnchorImage(pred, IMG.shape, segmentation_fn=grid, predictor_type="class")
    exps = []
    for seed in range(12):
        exps.append(ex.explain(IMG, seed=seed, batch_size=batch, **FAST))
        if exps[-1].raw["rows_per_call"] is not None:
            break
    return ex, exps


def test_auto_rows_per_call_keeps_the_size_the_predictor_labels_fastest() -> None:
    """predict_batch_size='auto' times calls of batch_size, /2 and /4 rows, keeps the fastest per row
    (the largest within 10 % of it), and from then on sends calls of that size; the anchors are those
    of fixed-size calls."""
    pred = SizeCost(cut=15, slow=4e-4, fast=2e-5)  # 20x cheaper per row in calls of <= 15 rows
    ex, exps = explain_until_calibrated(pred, batch=40)
    last = exps[-1]
    assert last.raw["rows_per_call"] == 10, last.raw["call_sizes"]
    per_row = last.raw["call_sizes"]["seconds_per_row"]
    assert per_row["40"] > 5 * per_row["10"] and per_row["20"] > 5 * per_row["10"]
    assert last.meta["params"]["predict_batch_size"] == "auto"
    n_before = len(pred.sizes)
    again = ex.explain(IMG, seed=99, batch_size=40, **FAST)
    assert again.raw["rows_per_call"] == 10 and max(pred.sizes[n_before + 1:]) <= 10  # [n_before]: the instance
    ref = AnchorImage(keyed, IMG.shape, segmentation_fn=grid, predictor_type="class")
    for seed, e in [(99, again)] + list(enumerate(exps)):
        r = ref.explain(IMG, seed=seed, batch_size=40, predict_batch_size=None, **FAST)
        assert e.raw["feature"] == r.raw["feature"] and e.raw["precision"] == r.raw["precision"]
        assert e.raw["labelled"] == r.raw["labelled"]
    # a predictor whose cost is per call keeps the largest calls
    flat = SizeCost(cut=10**6, slow=0.0, fast=1e-6, per_call=3e-3)
    _, exps = explain_until_calibrated(flat, batch=40)
    assert exps[-1].raw["rows_per_call"] == 40, exps[-1].raw["call_sizes"]


def test_call_sizer_candidates_and_threads() -> None:
    """Candidates are batch_size, //2, //4 (deduplicated, at least 1); a one-row batch needs no timing;
    concurrent explanations share one sizer per batch_size and each gets the anchor it gets alone."""
    from explainers.anchors.image import CallSizer

    assert CallSizer(100).sizes == [100, 50, 25] and CallSizer(3).sizes == [3, 1]
    assert CallSizer(1).chosen == 1
    s = CallSizer(8, trials=2)
    s.record(8, 5, 1.0)  # a short last chunk is not a timing of size 8
    assert s.times[8] == [] and s.next_size(20) == 8
    assert s.next_size(5) == 4 and s.next_size(1) == 1  # sizes the rows left can fill; fewer rows: one call
    s.record(8, 8, 8e-3), s.record(8, 8, 8e-3)
    assert s.next_size(20) == 4  # the least-timed size that fits
    pred = SizeCost(cut=15, slow=2e-4, fast=2e-5)
    ex = AnchorImage(pred, IMG.shape, segmentation_fn=grid, predictor_type="class")
    errors: list[BaseException] = []
    got: dict[int, dict] = {}

    def run(seed: int) -> None:
        try:
            got[seed] = ex.explain(IMG, seed=seed, batch_size=40, **FAST).raw
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and list(ex._call_sizers) == [40]
    sizer = ex._call_sizers[40]
    assert sizer.chosen in (None, 10), sizer.summary()  # the 20x cheaper size, once every size is timed
    ref = AnchorImage(keyed, IMG.shape, segmentation_fn=grid, predictor_type="class")
    for seed, raw in got.items():
        alone = ref.explain(IMG, seed=seed, batch_size=40, predict_batch_size=None, **FAST).raw
        assert (raw["feature"], raw["precision"], raw["labelled"]) == \
            (alone["feature"], alone["precision"], alone["labelled"])


def test_focused_draws_label_only_what_the_blocking_arms_use() -> None:
    """KL-LUCB's shared draws with ``wanted`` arms: only draws keeping a wanted arm's superpixel are
    labelled, only anchors containing one are credited, and each credited arm's samples keep every
    other superpixel at rate 1 - p_sample (its own distribution: conditioning on 'superpixel 1 or 5
    kept' must not leak into arm (1,)'s rate for superpixel 5)."""
    from explainers.anchors.base import AnchorSearch, Predictor
    from explainers.anchors.image import ImageSampler

    segs = grid(IMG) - 1
    sampler = ImageSampler(IMG, segs, 1, Predictor(keyed), 0.5, None)
    search = AnchorSearch(sampler, np.random.default_rng(0), lucb_arms=2)
    singles = [(f,) for f in range(16)]
    for a in singles:
        search.t_order[a] = list(a)
    search.tracked = singles + [(1, 5), (3, 5)]
    for a in [(1, 5), (3, 5)]:
        search.t_order[a] = list(a)
    for _ in range(20):
        pos, tot = search.draw_samples([(1,), (5,)], 100, wanted=[(1,), (5,)])
        assert np.all(tot >= 100)
    assert sampler.drawn == search.current  # every stored draw was sent for labelling
    kept = search.data[:search.current]
    assert kept[:, [1, 5]].any(axis=1).all(), "a draw keeping neither wanted superpixel was labelled"
    for a in singles:
        if a in ((1,), (5,)):
            continue
        assert search.t_nsamples.get(a, 0) == 0, f"{a} has no wanted superpixel but was credited"
    assert search.t_nsamples[(3, 5)] > 0 and search.t_nsamples[(1, 5)] > 0
    for a, other in (((1,), 5), ((5,), 1)):
        rows = search._idx(a)
        rate = search.data[rows, other].mean()
        assert abs(rate - 0.5) < 4 * np.sqrt(0.25 / len(rows)), (a, rate, len(rows))
    # (1,) and (5,) together: 3 of the 4 keep patterns of the pair are labelled (the parent's would be 4)
    both = kept[:, 1] & kept[:, 5]
    assert abs(both.mean() - 1 / 3) < 4 * np.sqrt(2 / 9 / len(kept))


def test_examples_come_from_counted_samples_without_labelling_more() -> None:
    """The explanation's examples are built from samples the search already labelled and counted for
    each partial anchor: no predictor row is spent after the search, every example keeps the partial
    anchor's superpixels, and covered_true / covered_false have the labels they claim."""
    from explainers.anchors.base import AnchorSearch, Predictor
    from explainers.anchors.image import ImageSampler

    segs = grid(IMG) - 1
    sampler = ImageSampler(IMG, segs, 1, Predictor(keyed), 0.5, None)
    seen = {}

    class Watched(AnchorSearch):
        def metadata(self, *a, **k):  # type: ignore[override]
            seen["before"] = sampler.labelled
            out = super().metadata(*a, **k)
            seen["after"] = sampler.labelled
            return out

    search = Watched(sampler, np.random.default_rng(1), lucb_arms=2)
    res = search.anchor_beam(coverage_samples=1000)
    assert sorted(res["feature"]) == [1, 5]
    assert seen["after"] == seen["before"]
    cur: tuple = ()
    for f, step in zip(res["feature"], res["examples"]):
        cur = tuple(sorted(cur + (f,)))
        t_rows, f_rows = search.t_ex_rows[cur]
        assert len(step["covered_true"]) == len(t_rows) <= 10 and len(step["covered_false"]) == len(f_rows) <= 10
        assert len(t_rows) + len(f_rows) > 0
        assert search.data[np.r_[t_rows, f_rows]][:, list(cur)].all()
        assert search.labels[t_rows].all() and not search.labels[f_rows].any()
        # the stored examples are those rows' images (scaled as alibi shows them); relabel them independently
        imgs = sampler.images(search._gather(np.r_[t_rows, f_rows]))
        np.testing.assert_array_equal(keyed(imgs) == 1, np.r_[np.ones(len(t_rows), bool), np.zeros(len(f_rows), bool)])
        for got, img in zip(list(step["covered_true"]) + list(step["covered_false"]), imgs):
            np.testing.assert_allclose(got, (img - img.min()) / (img.max() - img.min()) * 255, rtol=1e-5, atol=1e-3)
