"""AnchorImage: anchors over superpixels, a drop-in for alibi 0.9.6's ``AnchorImage``.

The image is segmented into superpixels (scikit-image's slic, felzenszwalb or quickshift, or a
custom function); a perturbed sample keeps each superpixel with probability ``1 - p_sample`` (always,
for the anchor's superpixels) and replaces the others by the superpixel's mean colour or by the same
pixels of a random background image. A sample is kept as its superpixel mask; images are built
(one vectorised pass over the reused per-pixel segment map) only for the rows the predictor must
label, and each distinct masked image is labelled once per explanation (alibi builds every image in
a Python loop and labels every draw).

Segment labels are always renumbered ``0..K-1`` in order of appearance of their value, whatever the
segmentation function returns: with scikit-image >= 0.19 ``slic`` starts at 1 unless told otherwise,
and alibi, which uses raw labels as column indices, then never perturbs one superpixel (alibi #748).
"""

from __future__ import annotations

import copy
import threading
import time
from functools import partial
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .base import Explanation, explainer_meta, resolve_predictor, search_with_call_knobs, summary_precision_coverage

DEFAULT_SEGMENTATION_KWARGS: dict[str, dict] = {
    "felzenszwalb": {},
    "quickshift": {},
    "slic": {"n_segments": 10, "compactness": 10, "sigma": 0.5, "start_label": 0},
}
SEGMENTATION_FNS = tuple(DEFAULT_SEGMENTATION_KWARGS)


def scale_image(image: np.ndarray, scale: tuple = (0, 255)) -> np.ndarray:
    """Min-max scale to ``scale`` (as alibi does for stored examples and the masked image)."""
    lo, hi = float(image.min()), float(image.max())
    if hi == lo:
        return np.full(image.shape, scale[0], dtype=float)
    return (image - lo) / (hi - lo) * (scale[1] - scale[0]) + scale[0]


def _builtin_segmentation(name: str, kwargs: Mapping[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    from skimage import segmentation as seg

    fn = {"felzenszwalb": seg.felzenszwalb, "slic": seg.slic, "quickshift": seg.quickshift}[name]
    return partial(fn, **dict(kwargs))


def _rows_per_call(predict_batch_size: int | str | None, batch_size: Any) -> int | None:
    """``predict_batch_size`` resolved: ``'auto'`` -> ``batch_size`` (the largest call; checked later by
    the search), else checked here."""
    if isinstance(predict_batch_size, str) and predict_batch_size == "auto":
        ok = isinstance(batch_size, (int, np.integer)) and not isinstance(batch_size, bool) and batch_size >= 1
        return int(batch_size) if ok else None
    if predict_batch_size is None:
        return None
    if isinstance(predict_batch_size, bool) or not isinstance(predict_batch_size, (int, np.integer)) \
            or predict_batch_size < 1:
        raise ValueError(f"predict_batch_size must be 'auto', None or a positive integer, got {predict_batch_size!r}")
    return int(predict_batch_size)


class CallSizer:
    """Rows per predictor call for ``predict_batch_size='auto'``, chosen by timing the calls the search
    makes anyway.

    Why: a model's cost per row can depend on the call size in ways only a measurement shows. In the
    anchors benchmark the digits CNN on one CPU thread, timed by this class inside the explaining
    process, cost 0.17-0.22 ms per image in 100-row calls and 0.07-0.08 ms in 25-row calls under
    glibc's default allocator; with the allocator told never to return memory to the kernel every size
    cost ~0.09 ms (large buffers past malloc's mmap threshold are otherwise mapped and faulted in
    afresh on every call). Which sizes are cheap depends on the model, the machine and the process's
    allocator state, so it is measured rather than guessed.

    Candidates are ``largest``, ``largest // 2`` and ``largest // 4``. Until each has ``trials``
    timed calls of exactly its size, calls rotate among those the rows left to label can fill
    (least-timed first; rows fewer than the smallest go in one untimed call); then the largest
    candidate whose median time per row is within ``margin`` of the best is kept (fewer calls at equal
    cost). Only the grouping of rows into calls depends on it, never a label; the choice is kept for
    the explainer's later explanations with the same ``largest``.
    """

    def __init__(self, largest: int, trials: int = 3, margin: float = 0.1) -> None:
        self.largest = int(largest)
        self.sizes = sorted({max(1, self.largest // d) for d in (1, 2, 4)}, reverse=True)
        self.trials, self.margin = int(trials), float(margin)
        self.times: dict[int, list[float]] = {s: [] for s in self.sizes}
        self.chosen: int | None = self.sizes[0] if len(self.sizes) == 1 else None
        self._lock = threading.Lock()

    def next_size(self, remaining: int) -> int:
        """Rows of the next call when ``remaining`` rows are left to label: the chosen size, or while
        calibrating the least-timed candidate that this call can time (one of at most ``remaining``
        rows; all ``remaining`` rows in one call when every candidate is larger)."""
        with self._lock:
            if self.chosen is not None:
                return self.chosen
            fits = [s for s in self.sizes if s <= remaining]
            if not fits:
                return remaining
            return min(fits, key=lambda s: (len(self.times[s]), -s))

    def record(self, size: int, rows: int, seconds: float) -> None:
        """Time of one call of ``rows`` rows made for candidate ``size`` (a short last chunk is not timed)."""
        with self._lock:
            if self.chosen is not None or rows != size or size not in self.times:
                return
            self.times[size].append(seconds / rows)
            if all(len(t) >= self.trials for t in self.times.values()):
                per_row = {s: float(np.median(t)) for s, t in self.times.items()}
                best = min(per_row.values())
                self.chosen = max(s for s, c in per_row.items() if c <= best * (1.0 + self.margin))

    def summary(self) -> dict[str, Any]:
        """The chosen size (None while calibrating) and the median seconds per row of each candidate."""
        with self._lock:
            return {"rows_per_call": self.chosen,
                    "seconds_per_row": {str(s): float(np.median(t)) if t else None for s, t in self.times.items()}}


class MaskedBatch:
    """Perturbed images described, not built: the kept-superpixel masks and the replacement of each row.

    ``keep`` (n, K) bool, ``source`` (n,) int: the background image index, or -1 for the fudged
    (mean-coloured) image. Images are built only for the rows that must be labelled or shown.
    """

    __slots__ = ("keep", "source")

    def __init__(self, keep: np.ndarray, source: np.ndarray) -> None:
        self.keep, self.source = keep, source

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, idx: Any) -> "MaskedBatch":
        return MaskedBatch(self.keep[idx], self.source[idx])


class ImageSampler:
    """Superpixel perturbations of one image, each distinct masked image labelled at most once.

    A perturbed image is determined by which superpixels are kept and by the replacement image (the
    fudged image, or background ``i``). Keeping or replacing a superpixel whose replacement equals
    the image there gives the same image, so such superpixels are counted as kept in the image's
    key. Labels are cached by that key for the whole explanation: a masked image drawn again (by
    another arm, a later round, another beam) is not sent to the predictor again, and the rows of
    one draw that are the same image are labelled once. The search's statistics are unchanged: it
    sees one label per draw, the same label the predictor would give (predictors are taken to be
    deterministic per input, as the search already assumes). ``cache_labels=False`` labels every
    draw (alibi's behaviour), for comparison.
    """

    #: ``lucb_arms='auto'``: the paper's two arms per KL-LUCB round. An image model's cost grows with
    #: the rows (the digits CNN: ~0.4-1 ms per image, ~0.5 ms per call), so sampling every blocking
    #: arm (~16 x batch_size images per round) costs more than the rounds it saves.
    lucb_arms_auto = 2

    def __init__(self, image: np.ndarray, segments: np.ndarray, label: Any, predictor: Callable, p_sample: float,
                 images_background: np.ndarray | None, cache_labels: bool = True,
                 share_draws: bool = True, predict_batch_size: int | None = None,
                 call_sizer: CallSizer | None = None) -> None:
        self.image = image
        self.segments = segments
        self.label = label
        self.predictor = predictor
        self.p_sample = p_sample
        self.background = None if images_background is None else images_background.astype(image.dtype)
        self.n_features = int(segments.max()) + 1
        flat = segments.reshape(-1)
        counts = np.bincount(flat, minlength=self.n_features).astype(np.float64)
        pix = image.reshape(len(flat), -1).astype(np.float64)
        means = np.stack([np.bincount(flat, weights=pix[:, c], minlength=self.n_features)
                          for c in range(pix.shape[1])], axis=1) / counts[:, None]
        self.fudged = means[flat].reshape(image.shape).astype(image.dtype)
        # per replacement (row 0: fudged, row 1 + i: background i): superpixels it leaves unchanged
        sources = [self.fudged] + ([] if self.background is None else list(self.background))
        same = np.stack([(src == image).reshape(len(flat), -1).all(axis=1) for src in sources])  # (S, H*W)
        self.invariant = np.stack([np.bincount(flat, weights=s, minlength=self.n_features) == counts
                                   for s in same])
        # the segment mask of every pixel, reused for every image built (channels broadcast)
        self._pix_seg = segments.reshape(segments.shape + (1,) * (image.ndim - segments.ndim))
        self.cache_labels = bool(cache_labels)
        # superpixels are kept independently with probability 1 - p_sample: a draw conditioned on
        # anchor Q is a valid draw for every anchor between Q and its kept superpixels (the search
        # counts it for all of them; explainers.anchors.base.AnchorSearch._draw_shared)
        self.shared_draws = bool(share_draws)
        self.share_rate = 1.0 - float(p_sample)
        # rows per predictor call (None: all rows of a draw in one call); see AnchorImage.explain
        self.predict_batch_size = None if predict_batch_size is None else int(predict_batch_size)
        self.call_sizer = call_sizer  # when set, it decides the rows per call (predict_batch_size='auto')
        self._cache: dict[bytes, bool] = {}
        self.drawn = 0     # rows the search asked to label
        self.labelled = 0  # rows sent to the predictor

    def _masks(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.random((n, self.n_features)) >= self.p_sample  # True: superpixel kept

    def perturb(self, anchor: tuple[int, ...], n: int, rng: np.random.Generator) -> tuple[MaskedBatch, np.ndarray]:
        keep = self._masks(n, rng)
        if anchor:
            keep[:, list(anchor)] = True
        if self.background is not None:
            source = rng.integers(0, len(self.background), size=n)
        else:
            source = np.full(n, -1, dtype=np.int64)
        return MaskedBatch(keep, source), keep

    def images(self, batch: MaskedBatch) -> np.ndarray:
        """The masked images of ``batch``: (n,) + image shape, C-ordered."""
        n = len(batch)
        if self.background is not None:
            out = self.background[batch.source]
        else:
            out = np.empty((n,) + self.image.shape, dtype=self.image.dtype)
            out[:] = self.fudged
        pix_keep = batch.keep[:, self._pix_seg]  # (n, H, W[, 1])
        np.copyto(out, self.image[None], where=np.broadcast_to(pix_keep, out.shape))
        return out

    def _predict(self, batch: MaskedBatch) -> np.ndarray:
        """Labels equal to the instance's for the images of ``batch``, in calls of the call sizer's size,
        else of at most ``predict_batch_size`` rows (all in one call when None)."""
        n, sizer = len(batch), self.call_sizer
        self.labelled += n
        out, i = [], 0
        while i < n:
            size = sizer.next_size(n - i) if sizer is not None else (self.predict_batch_size or n)
            images = self.images(batch[i:i + size])
            t0 = time.perf_counter()
            labels = self.predictor(images)
            if sizer is not None:
                sizer.record(size, len(images), time.perf_counter() - t0)
            out.append(labels == self.label)
            i += size
        return np.concatenate(out) if out else np.zeros(0, dtype=bool)

    def _keys(self, batch: MaskedBatch) -> list[bytes]:
        """One key per distinct masked image: kept superpixels (plus the unchanged ones) and the replacement."""
        canon = batch.keep | self.invariant[batch.source + 1]
        src = (batch.source + 1).astype("<i4").view(np.uint8).reshape(len(batch), 4)
        packed = np.concatenate([np.packbits(canon, axis=1), src], axis=1)
        return [row.tobytes() for row in packed]

    def coverage_data(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return self._masks(n, rng)

    def labels(self, raw: MaskedBatch) -> np.ndarray:
        n = len(raw)
        self.drawn += n
        if not self.cache_labels:
            return self._predict(raw)
        keys = self._keys(raw)
        todo: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            if k not in self._cache and k not in todo:
                todo[k] = i
        if todo:
            rows = np.fromiter(todo.values(), dtype=np.int64, count=len(todo))
            fresh = self._predict(raw[rows])
            self._cache.update(zip(todo, fresh.tolist()))
        return np.fromiter((self._cache[k] for k in keys), dtype=bool, count=n)

    def concat(self, raws: Sequence[MaskedBatch]) -> MaskedBatch:
        return MaskedBatch(np.concatenate([r.keep for r in raws]), np.concatenate([r.source for r in raws]))

    def examples(self, raw: MaskedBatch) -> list[np.ndarray]:
        return [scale_image(img) for img in self.images(raw)] if len(raw) else []


class AnchorImage:
    """Anchors for image classifiers (drop-in for ``alibi.explainers.AnchorImage``).

    Parameters
    ----------
    predictor
        Callable on a batch of images ``(n,) + image_shape`` (channel-last, as alibi).
    image_shape
        Shape of one image, e.g. ``(28, 28, 1)``.
    dtype
        dtype of the batches passed to the predictor.
    segmentation_fn
        ``'slic'``, ``'felzenszwalb'``, ``'quickshift'`` or a callable ``image -> int labels (H, W)``.
    segmentation_kwargs
        Keyword arguments of the built-in segmentation (defaults as alibi's).
    images_background
        Optional ``(m,) + image_shape`` images whose pixels replace the perturbed superpixels.
    seed
        Default seed of ``explain``.
    predictor_type
        ``'class'`` (labels ``(n,)``) or ``'proba'`` (scores ``(n, n_classes)``); ``None`` (default):
        inferred as alibi does, from one call on a zero image (reported in ``meta['params']``).
    """

    def __init__(self, predictor: Callable[[np.ndarray], np.ndarray], image_shape: tuple, dtype: Any = np.float32,
                 segmentation_fn: Any = "slic", segmentation_kwargs: dict | None = None,
                 images_background: np.ndarray | None = None, seed: int | None = None,
                 predictor_type: str | None = None) -> None:
        self.image_shape = tuple(int(s) for s in image_shape)
        if len(self.image_shape) not in (2, 3) or min(self.image_shape) < 1:
            raise ValueError(f"image_shape must be (H, W) or (H, W, C), got {image_shape}")
        self.dtype = dtype
        self.predictor, kind = resolve_predictor(predictor, predictor_type,
                                                 lambda: np.zeros((1,) + self.image_shape, dtype=dtype))
        self.predictor_type = kind["predictor_type"]
        if callable(segmentation_fn):
            self.custom_segmentation = True
            self.segmentation_fn = segmentation_fn
            seg_name = "custom"
        elif isinstance(segmentation_fn, str):
            if segmentation_fn not in SEGMENTATION_FNS:
                raise ValueError(f"segmentation_fn must be one of {SEGMENTATION_FNS} or a callable, "
                                 f"got {segmentation_fn!r}")
            if segmentation_kwargs is None:
                segmentation_kwargs = dict(DEFAULT_SEGMENTATION_KWARGS[segmentation_fn])
            self.custom_segmentation = False
            self.segmentation_fn = _builtin_segmentation(segmentation_fn, segmentation_kwargs)
            seg_name = segmentation_fn
        else:
            raise TypeError(f"segmentation_fn must be a name or a callable, got {type(segmentation_fn).__name__}")
        if images_background is not None:
            images_background = np.asarray(images_background)
            if images_background.ndim != len(self.image_shape) + 1 or \
                    tuple(images_background.shape[1:]) != self.image_shape:
                raise ValueError(f"images_background must have shape (m,) + {self.image_shape}, "
                                 f"got {images_background.shape}")
        self.images_background = images_background
        self.seed = seed
        self.p_sample = 0.5
        # predict_batch_size='auto': one call sizer per batch_size, kept across explanations (same predictor)
        self._call_sizers: dict[int, CallSizer] = {}
        self._sizers_lock = threading.Lock()
        self.meta = explainer_meta("AnchorImage", {
            "custom_segmentation": self.custom_segmentation, "segmentation_fn": seg_name,
            "segmentation_kwargs": segmentation_kwargs, "seed": seed, "image_shape": self.image_shape, **kind})

    @property
    def predict_fn(self) -> Callable[[np.ndarray], np.ndarray]:
        """Class labels of a batch of images (one image of ``image_shape`` is a batch of one), as alibi's."""
        def predict(X: np.ndarray) -> np.ndarray:
            X = np.asarray(X)
            return self.predictor(X[None] if tuple(X.shape) == self.image_shape else X)
        return predict

    def generate_superpixels(self, image: np.ndarray) -> np.ndarray:
        """Segment ``image``; labels renumbered to ``0..K-1`` (see the module note on slic's start_label)."""
        img = np.asarray(image)
        if not self.custom_segmentation and img.ndim == 3 and img.shape[-1] == 1:
            img = np.repeat(img, 3, axis=2)
        seg = np.asarray(self.segmentation_fn(img))
        if seg.shape != tuple(image.shape[:2]):
            raise ValueError(f"segmentation returned shape {seg.shape}, expected {tuple(image.shape[:2])}")
        _, inv = np.unique(seg, return_inverse=True)
        return inv.reshape(seg.shape).astype(np.int64)

    def explain(self, image: np.ndarray, p_sample: float = 0.5, threshold: float = 0.95, delta: float = 0.1,
                tau: float = 0.15, batch_size: int = 100, coverage_samples: int = 10000, beam_size: int = 1,
                stop_on_first: bool = False, max_anchor_size: int | None = None, min_samples_start: int = 100,
                n_covered_ex: int = 10, binary_cache_size: int = 10000, cache_margin: int = 1000,
                verbose: bool = False, verbose_every: int = 1, seed: int | None = None,
                lucb_arms: int | str | None = "auto",
                segments: np.ndarray | None = None, cache_labels: bool = True, share_draws: bool = True,
                predict_batch_size: int | str | None = "auto", **kwargs: Any) -> Explanation:
        """Explain the prediction on one image (``image_shape``).

        ``p_sample``: probability that a superpixel outside the anchor is perturbed (also used for
        the coverage samples). ``segments``: optional precomputed superpixel labels (H, W).
        ``cache_labels``: label each distinct masked image once per explanation (default; the same
        anchor as without, fewer predictor rows); ``False`` labels every draw, as alibi does.
        ``share_draws``: count every labelled draw for every candidate anchor it is a valid sample of
        and draw the candidates of a KL-LUCB round from their common parent (default, when
        ``1 - p_sample >= 0.25``); ``False`` samples each candidate from its own distribution only,
        as alibi does. ``raw['num_preds']`` counts draws; ``raw['labelled']`` the rows the predictor saw.
        ``predict_batch_size``: most rows per predictor call. ``'auto'`` (default): ``batch_size``
        (the rows alibi sends per call), ``batch_size // 2`` or ``batch_size // 4``, whichever the
        predictor labels fastest per row, timed on the calls the search makes anyway (``CallSizer``;
        the choice is kept for this explainer's later explanations and reported in
        ``raw['rows_per_call']``, with the timings in ``raw['call_sizes']``). An integer caps the rows
        per call; ``None`` sends every image of a draw in one call. Shared draws label ~2 x batch_size
        images per KL-LUCB round, and a CNN on one CPU thread can label those slower per image in one
        large call than in smaller ones (the anchors benchmark's digits CNN under glibc's default
        allocator: 0.17-0.22 ms per image in 100-row calls, 0.07-0.08 ms in 25-row calls).
        It changes only how rows are grouped into calls, never a label or the anchor.
        """
        image = np.asarray(image)
        if tuple(image.shape) != self.image_shape:
            raise ValueError(f"image must have shape {self.image_shape}, got {image.shape}")
        if not np.all(np.isfinite(image)):
            raise ValueError("image contains NaN or infinite values")
        if not 0.0 <= float(p_sample) <= 1.0:
            raise ValueError(f"p_sample must be in [0, 1], got {p_sample}")
        if segments is None:
            segs = self.generate_superpixels(image)
        else:
            segs = np.asarray(segments)
            if segs.shape != image.shape[:2]:
                raise ValueError(f"segments must have shape {image.shape[:2]}, got {segs.shape}")
            segs = np.unique(segs, return_inverse=True)[1].reshape(segs.shape).astype(np.int64)
        rows_per_call = _rows_per_call(predict_batch_size, batch_size)
        sizer = None
        if isinstance(predict_batch_size, str) and rows_per_call is not None:
            with self._sizers_lock:
                sizer = self._call_sizers.setdefault(rows_per_call, CallSizer(rows_per_call))
        image = image.astype(self.dtype, copy=False)
        label = self.predictor(image[None])[0]
        sampler = ImageSampler(image, segs, label, self.predictor, float(p_sample), self.images_background,
                               cache_labels=cache_labels, share_draws=share_draws,
                               predict_batch_size=rows_per_call, call_sizer=sizer)
        result, params = search_with_call_knobs(sampler, self.seed, locals())
        raw = dict(result)
        raw["labelled"] = int(sampler.labelled)
        # rows per predictor call: the cap, or for 'auto' the calibrated size (None while still calibrating)
        raw["rows_per_call"] = sizer.chosen if sizer is not None else rows_per_call
        if sizer is not None:
            raw["call_sizes"] = sizer.summary()
        raw["instance"] = image
        raw["instances"] = image[None]
        raw["prediction"] = np.array([label])
        raw["segments_in_anchor"] = list(result["feature"])
        precision, coverage = summary_precision_coverage(result)
        data = dict(anchor=self.overlay_mask(image, segs, result["feature"]), segments=segs,
                    precision=precision, coverage=coverage, raw=raw)
        meta = copy.deepcopy(self.meta)
        meta["params"].update(params, p_sample=p_sample, cache_labels=bool(cache_labels),
                              share_draws=bool(share_draws), predict_batch_size=predict_batch_size)
        return Explanation(meta=meta, data=data)

    @staticmethod
    def overlay_mask(image: np.ndarray, segments: np.ndarray, mask_features: Sequence[int],
                     scale: tuple = (0, 255)) -> np.ndarray:
        """The image scaled to ``scale`` with every superpixel outside the anchor set to 0 (int)."""
        mask = np.isin(segments, list(mask_features))
        img = scale_image(image, scale=scale)
        if img.ndim == 3:
            mask = mask[..., None]
        return (img * mask).astype(int)


__all__ = ["AnchorImage", "ImageSampler", "MaskedBatch", "DEFAULT_SEGMENTATION_KWARGS"]
