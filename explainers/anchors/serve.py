"""Served anchors: what the gRPC server's ``ExplainAnchors`` RPC calls, for every modality.

* :func:`model_predict_fn` turns a registered model's score function into the label function the
  explainers call: text goes through the model's own ``preprocess`` (the function its build
  config names), channel-last image batches are moved to channel-first for a PyTorch model.
* ``explain_anchors(predict_fn, kind, request) -> dict`` validates the request (every problem is a
  ``ValueError`` whose message says what to fix; the server maps it to INVALID_ARGUMENT), runs the
  in-process explainer and returns plain Python/numpy values: alibi's ``Explanation`` fields
  (``meta``; ``anchor``, ``precision``, ``coverage``, ``raw`` and, for images, the masked anchor
  image and the segment map), so the server only has to encode them. The request keys are
  documented in ``docs/anchors.md``.

spaCy pipelines and language models named in requests are loaded once and cached (by name or
path); fitted tabular explainers are cached by the content hash of their training data, so a
served model with a fixed background set is discretised once.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .base import PREDICTOR_TYPES, SEARCH_DEFAULTS, validate_search_params

KINDS = ("tabular", "text", "image")
_SEARCH_KEYS = tuple(SEARCH_DEFAULTS) + ("seed",)
_TABULAR_KEYS = {"instance", "train_data", "feature_names", "categorical_names", "disc_perc", "ohe", "ohe_drop"}
_TEXT_KEYS = {"text", "sampling_strategy", "nlp", "language_model", "sample_proba", "top_n", "temperature",
              "use_proba", "filling", "frac_mask_templates", "batch_size_lm", "punctuation", "stopwords",
              "sample_punctuation"}
_IMAGE_KEYS = {"image", "image_shape", "segmentation_fn", "segmentation_kwargs", "images_background", "p_sample",
               "segments"}
_COMMON_KEYS = set(_SEARCH_KEYS) | {"predictor_type"}

_cache_lock = threading.Lock()
_resources: "OrderedDict[tuple, Any]" = OrderedDict()
_MAX_CACHED = 8


def _cached(key: tuple, make: Callable[[], Any]) -> Any:
    with _cache_lock:
        if key in _resources:
            _resources.move_to_end(key)
            return _resources[key]
    value = make()
    with _cache_lock:
        _resources[key] = value
        while len(_resources) > _MAX_CACHED:
            _resources.popitem(last=False)
    return value


def _array(request: Mapping, key: str, ndim: tuple[int, ...], dtype: Any = np.float64) -> np.ndarray:
    if key not in request or request[key] is None:
        raise ValueError(f"request needs {key!r}")
    try:
        arr = np.asarray(request[key], dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{key!r} must be a numeric array: {e}") from None
    if arr.ndim not in ndim:
        raise ValueError(f"{key!r} must have {' or '.join(map(str, ndim))} dimensions, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{key!r} contains NaN or infinite values")
    return arr


def _search_params(request: Mapping) -> dict:
    p = {k: request.get(k, SEARCH_DEFAULTS.get(k)) for k in SEARCH_DEFAULTS}
    try:
        validate_search_params(**{k: p[k] for k in ("threshold", "delta", "tau", "batch_size", "coverage_samples",
                                                    "beam_size", "max_anchor_size", "min_samples_start",
                                                    "n_covered_ex", "binary_cache_size", "cache_margin")})
    except TypeError as e:
        raise ValueError(str(e)) from None
    # a served call must stay bounded: cap the work a client can ask for
    if p["coverage_samples"] > 1_000_000 or p["batch_size"] > 100_000:
        raise ValueError("coverage_samples must be <= 1000000 and batch_size <= 100000")
    if p["binary_cache_size"] * p["batch_size"] > 10_000_000:
        p["binary_cache_size"] = max(1, 10_000_000 // p["batch_size"])
    p["stop_on_first"] = bool(p["stop_on_first"])
    seed = request.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    p["seed"] = None if seed is None else int(seed)
    return p


def _alibi_fields(exp: Any) -> dict:
    """alibi's Explanation as plain JSON values: ``meta`` and ``raw`` (every key alibi's raw has)."""
    d = json.loads(exp.to_json())
    return {"meta": d["meta"], "raw": d["data"]["raw"]}


def _tabular(predict_fn: Callable, request: Mapping, search: dict, predictor_type: str) -> dict:
    from .tabular import AnchorTabular

    names = request.get("feature_names")
    train = _array(request, "train_data", (2,))
    x = _array(request, "instance", (1, 2))
    if x.ndim == 2:
        if x.shape[0] != 1:
            raise ValueError(f"'instance' must be one row, got shape {x.shape}")
        x = x[0]
    if names is None:
        names = [f"x{i}" for i in range(train.shape[1])] if not request.get("ohe") else None
    if names is None:
        raise ValueError("'feature_names' is required with ohe=True")
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError("'feature_names' must be a list of strings")
    cat = request.get("categorical_names") or {}
    if not isinstance(cat, Mapping):
        raise ValueError("'categorical_names' must map column index to a list of category names")
    try:
        cat = {int(k): list(v) for k, v in cat.items()}
    except (TypeError, ValueError):
        raise ValueError("'categorical_names' keys must be column indices") from None
    ohe = bool(request.get("ohe", False))
    n_cols = train.shape[1]
    if not ohe and n_cols != len(names):
        raise ValueError(f"'train_data' has {n_cols} features but 'feature_names' names {len(names)}")
    if x.shape[0] != n_cols:
        raise ValueError(f"'instance' has {x.shape[0]} features, expected {n_cols} (as 'train_data')")
    disc_perc = tuple(request.get("disc_perc", (25, 50, 75)))
    ohe_drop = request.get("ohe_drop")
    if isinstance(ohe_drop, Mapping):
        ohe_drop = {int(k): v for k, v in ohe_drop.items()}
    h = hashlib.sha256(np.ascontiguousarray(train).tobytes() + repr(
        (names, sorted(cat.items()), disc_perc, ohe, ohe_drop, predictor_type, id(predict_fn))).encode()).hexdigest()

    def make() -> AnchorTabular:
        ex = AnchorTabular(predict_fn, names, categorical_names=cat or None, ohe=ohe, ohe_drop=ohe_drop,
                           predictor_type=predictor_type)
        return ex.fit(train, disc_perc=disc_perc)

    explainer = _cached(("tabular", h), make)
    seed = search.pop("seed")
    exp = explainer.explain(x, seed=seed, **search)
    return {"kind": "tabular", "anchor": list(exp.anchor), "precision": float(exp.precision),
            "coverage": float(exp.coverage), **_alibi_fields(exp),
            "predicates": [list(map(int, p)) for p in exp.raw["predicates"]]}


def _text(predict_fn: Callable, request: Mapping, search: dict, predictor_type: str) -> dict:
    from .text import SAMPLING_STRATEGIES, AnchorText, LanguageModel, load_nlp

    text = request.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("'text' must be a non-empty string")
    strategy = request.get("sampling_strategy", "unknown")
    if strategy not in SAMPLING_STRATEGIES:
        raise ValueError(f"'sampling_strategy' must be one of {SAMPLING_STRATEGIES}, got {strategy!r}")
    opts = {k: request[k] for k in AnchorText.DEFAULTS[strategy] if k in request}
    stray = {k for k in _TEXT_KEYS - {"text", "sampling_strategy", "nlp", "language_model"} if k in request} - set(opts)
    if stray:
        raise ValueError(f"keys {sorted(stray)} do not apply to sampling_strategy={strategy!r}")
    if strategy == "language_model":
        lm_path = request.get("language_model")
        if not isinstance(lm_path, str):
            raise ValueError("'language_model' must name a local Hugging Face model directory")
        lm = _cached(("lm", lm_path), lambda: LanguageModel(lm_path))
        explainer = AnchorText(predict_fn, strategy, language_model=lm, predictor_type=predictor_type, **opts)
    else:
        nlp_name = request.get("nlp", "en")
        if not isinstance(nlp_name, str):
            raise ValueError("'nlp' must name an installed spaCy package or pipeline directory")

        def make_nlp() -> Any:
            if nlp_name == "en":
                import spacy

                return spacy.blank("en")
            return load_nlp(nlp_name)

        nlp = _cached(("nlp", nlp_name), make_nlp)
        explainer = AnchorText(predict_fn, strategy, nlp=nlp, predictor_type=predictor_type, **opts)
    if "stop_on_first" not in request:
        search["stop_on_first"] = True  # alibi's default for text
    seed = search.pop("seed")
    exp = explainer.explain(text, seed=0 if seed is None else seed, **search)
    return {"kind": "text", "anchor": list(exp.anchor), "precision": float(exp.precision),
            "coverage": float(exp.coverage), "positions": [int(p) for p in exp.raw["positions"]],
            **_alibi_fields(exp)}


def _image(predict_fn: Callable, request: Mapping, search: dict, predictor_type: str) -> dict:
    from .image import SEGMENTATION_FNS, AnchorImage

    image = _array(request, "image", (2, 3), dtype=np.float32)
    if image.ndim == 2:
        image = image[..., None]
    shape = request.get("image_shape")
    if shape is not None and tuple(shape) != image.shape and tuple(shape) != image.shape[:2]:
        raise ValueError(f"'image' has shape {image.shape}, but 'image_shape' says {tuple(shape)}")
    seg = request.get("segmentation_fn", "slic")
    if seg not in SEGMENTATION_FNS:
        raise ValueError(f"'segmentation_fn' must be one of {SEGMENTATION_FNS} (or send 'segments'), got {seg!r}")
    seg_kwargs = request.get("segmentation_kwargs")
    if seg_kwargs is not None and not isinstance(seg_kwargs, Mapping):
        raise ValueError("'segmentation_kwargs' must be a dict")
    bg = request.get("images_background")
    if bg is not None:
        bg = _array(request, "images_background", (3, 4), dtype=np.float32)
        if bg.ndim == 3:
            bg = bg[..., None]
        if bg.shape[1:] != image.shape:
            raise ValueError(f"'images_background' must have shape (m,) + {image.shape}, got {bg.shape}")
    segments = request.get("segments")
    if segments is not None:
        segments = np.asarray(segments)
        if segments.shape != image.shape[:2] or not np.issubdtype(segments.dtype, np.integer):
            raise ValueError(f"'segments' must be integer labels of shape {image.shape[:2]}")
    p_sample = request.get("p_sample", 0.5)
    if isinstance(p_sample, bool) or not isinstance(p_sample, (int, float)) or not 0 <= p_sample <= 1:
        raise ValueError(f"'p_sample' must be in [0, 1], got {p_sample!r}")
    try:
        explainer = AnchorImage(predict_fn, image.shape, segmentation_fn=seg,
                                segmentation_kwargs=dict(seg_kwargs) if seg_kwargs else None,
                                images_background=bg, predictor_type=predictor_type)
        seed = search.pop("seed")
        exp = explainer.explain(image, p_sample=float(p_sample), seed=seed, segments=segments, **search)
    except TypeError as e:  # bad segmentation_kwargs reach scikit-image as TypeError
        raise ValueError(f"bad segmentation_kwargs for {seg!r}: {e}") from None
    return {"kind": "image", "anchor": [int(f) for f in exp.raw["feature"]], "precision": float(exp.precision),
            "coverage": float(exp.coverage), "masked_image": np.asarray(exp.anchor),
            "segments": np.asarray(exp.segments), **_alibi_fields(exp)}


def explain_anchors(predict_fn: Callable[[Any], Any], kind: str, request: Mapping[str, Any]) -> dict:
    """Explain one input of a served model with anchors.

    Parameters
    ----------
    predict_fn
        The registered model's predict function: rows (tabular, user encoding), a list of str
        (text) or channel-last images ``(n, H, W, C)`` (image).
    kind
        ``'tabular'``, ``'text'`` or ``'image'``.
    request
        The parameters (see ``docs/anchors.md``): the input, the search knobs with alibi's
        defaults, ``seed``, ``predictor_type`` ('class' or 'proba') and the modality's options.

    Returns a plain dict: ``kind``, ``anchor``, ``precision``, ``coverage``, ``meta`` and ``raw``
    (alibi's: explainer name and parameters; per-step precision/coverage, feature ids, names,
    examples, ``num_preds``, ``success``, ``prediction``, ``instance``) and, for images,
    ``masked_image`` (alibi's ``anchor``) and ``segments``.

    Raises ``ValueError`` for any invalid request (the server answers INVALID_ARGUMENT).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(request, Mapping):
        raise ValueError("request must be a dict")
    allowed = _COMMON_KEYS | {"tabular": _TABULAR_KEYS, "text": _TEXT_KEYS, "image": _IMAGE_KEYS}[kind]
    unknown = sorted(set(request) - allowed)
    if unknown:
        raise ValueError(f"unknown request keys for kind={kind!r}: {unknown}")
    predictor_type = request.get("predictor_type", "class")
    if predictor_type not in PREDICTOR_TYPES:
        raise ValueError(f"'predictor_type' must be one of {PREDICTOR_TYPES}, got {predictor_type!r}")
    search = _search_params(request)
    handler = {"tabular": _tabular, "text": _text, "image": _image}[kind]
    return handler(predict_fn, request, search, predictor_type)


def model_predict_fn(predict_scores: Callable[[np.ndarray], Any], kind: str, *,
                     input_shape: Sequence[int] | None = None, framework: str | None = None,
                     preprocess: Callable[[list[str]], Any] | None = None, model: str = "the model"
                     ) -> Callable[[Any], np.ndarray]:
    """The label function anchors call, built from a registered model's score function.

    ``predict_scores`` maps a float32 batch in the model's own layout to class scores ``(n, k)``.
    ``kind='text'``: the texts go through ``preprocess`` (the model's registered text
    preprocessing, e.g. a tokenizer or a bag of words) first; a model without one cannot take text
    and is refused with a ``ValueError`` saying so. ``kind='image'``: anchors hand over channel-last
    ``(n, H, W, C)`` batches; a PyTorch model whose input is 3-D (C, H, W) gets them channel-first.
    ``kind='tabular'``: rows as they are. The labels are the argmax of the scores.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    shape = list(input_shape or [])
    if kind == "text":
        if preprocess is None:
            raise ValueError(f"model {model!r} takes numeric inputs{f' of shape {shape}' if shape else ''}, not "
                             "text: text anchors need a model registered with a text preprocess function "
                             "(data.preprocess in its build config)")

        def to_model(texts: Any) -> np.ndarray:
            return np.asarray(preprocess(list(texts)), dtype=np.float32)
    elif kind == "image" and framework == "pytorch" and len(shape) == 3:
        def to_model(X: Any) -> np.ndarray:
            return np.ascontiguousarray(np.moveaxis(np.asarray(X, dtype=np.float32), -1, 1))
    else:
        def to_model(X: Any) -> np.ndarray:
            return np.asarray(X, dtype=np.float32)

    def predict(X: Any) -> np.ndarray:
        return np.asarray(predict_scores(to_model(X))).argmax(-1)

    return predict


__all__ = ["explain_anchors", "model_predict_fn", "KINDS"]
