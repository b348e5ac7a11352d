"""AnchorText: anchors for text classifiers, a drop-in for alibi 0.9.6's ``AnchorText``.

Three perturbation strategies, as in alibi:

* ``'unknown'``: each word outside the anchor is replaced by ``UNK`` with probability ``sample_proba``.
* ``'similarity'``: ... by a word drawn among its ``top_n`` nearest neighbours in the spaCy pipeline's
  word vectors (uniformly, or by ``exp(similarity / temperature)`` with ``use_proba=True``). When
  the pipeline has a tagger, only words with a part of speech in ``pos`` are perturbed and
  neighbours must have the same fine-grained tag, as alibi does; a pipeline without a tagger (e.g. a
  blank pipeline with vectors) has no tags, so every word with neighbours is perturbed and
  neighbours are not filtered by tag (alibi would then perturb nothing). Any installed spaCy package
  or pipeline directory can be given by name.
* ``'language_model'``: words are masked and refilled by a masked language model loaded from a
  local Hugging Face directory (PyTorch; nothing is downloaded), in one pass (``filling='parallel'``,
  with ``frac_mask_templates`` templates) or word by word (``'autoregressive'``).

All randomness comes from the per-call ``np.random.Generator`` (the language model's sampling too),
so the same seed gives the same explanation and parallel calls are independent.

The samplers live in :mod:`.text_samplers` and the masked language model in :mod:`.language_model`;
this module holds the explainer and re-exports their names.
"""

from __future__ import annotations

import copy
import logging
import string
from typing import Any, Callable

import numpy as np

from .base import Explanation, explainer_meta, resolve_predictor, search_with_call_knobs, summary_precision_coverage
from .language_model import LanguageModel
from .text_samplers import LanguageModelSampler, Neighbors, SimilaritySampler, UnknownSampler, load_nlp

logger = logging.getLogger(__name__)

DEFAULT_SAMPLING_UNKNOWN = {"sample_proba": 0.5}
DEFAULT_SAMPLING_SIMILARITY = {"sample_proba": 0.5, "top_n": 100, "temperature": 1.0, "use_proba": False}
DEFAULT_SAMPLING_LANGUAGE_MODEL = {
    "filling": "parallel", "sample_proba": 0.5, "top_n": 100, "temperature": 1.0, "use_proba": False,
    "frac_mask_templates": 0.1, "batch_size_lm": 32, "punctuation": string.punctuation, "stopwords": [],
    "sample_punctuation": False,
}
SAMPLING_STRATEGIES = ("unknown", "similarity", "language_model")


class AnchorText:
    """Anchors for text classifiers (drop-in for ``alibi.explainers.AnchorText``).

    Parameters
    ----------
    predictor
        Callable on a list of strings.
    sampling_strategy
        ``'unknown'``, ``'similarity'`` or ``'language_model'``.
    nlp
        spaCy ``Language`` (or installed package name / pipeline directory): tokenizer for
        ``'unknown'`` and ``'similarity'``, and word vectors for ``'similarity'``.
    language_model
        :class:`LanguageModel` or a local Hugging Face directory, for ``'language_model'``.
    seed
        Default seed of ``explain`` (alibi's default 0).
    predictor_type
        ``'class'`` (labels) or ``'proba'`` (scores); ``None`` (default): inferred as alibi does,
        from one call on ``['Hello world']`` (reported in ``meta['params']``).
    **kwargs
        Sampling options with alibi's defaults (``sample_proba``, ``top_n``, ``temperature``,
        ``use_proba``, ``filling``, ``frac_mask_templates``, ``batch_size_lm``, ``punctuation``,
        ``stopwords``, ``sample_punctuation``); keys that do not apply to the strategy are ignored
        with a warning, as in alibi.
    """

    SAMPLING_UNKNOWN = "unknown"
    SAMPLING_SIMILARITY = "similarity"
    SAMPLING_LANGUAGE_MODEL = "language_model"
    DEFAULTS = {"unknown": DEFAULT_SAMPLING_UNKNOWN, "similarity": DEFAULT_SAMPLING_SIMILARITY,
                "language_model": DEFAULT_SAMPLING_LANGUAGE_MODEL}

    def __init__(self, predictor: Callable[[list[str]], np.ndarray], sampling_strategy: str = "unknown",
                 nlp: Any = None, language_model: Any = None, seed: int | None = 0,
                 predictor_type: str | None = None, **kwargs: Any) -> None:
        if sampling_strategy not in SAMPLING_STRATEGIES:
            raise ValueError(f"sampling_strategy must be one of {SAMPLING_STRATEGIES}, got {sampling_strategy!r}")
        self.sampling_strategy = sampling_strategy
        self.predictor, kind = resolve_predictor(predictor, predictor_type, lambda: ["Hello world"])
        self.predictor_type = kind["predictor_type"]
        opts = copy.deepcopy(self.DEFAULTS[sampling_strategy])
        bad = set(kwargs) - set(opts)
        if bad:
            logger.warning("The following keys are incorrect: %s", ", ".join(sorted(bad)))
        opts.update({k: v for k, v in kwargs.items() if k in opts})
        self._validate_opts(opts)
        self.perturb_opts = opts
        self.seed = seed
        self.nlp = None
        self.model = None
        if sampling_strategy == "language_model":
            if language_model is None:
                raise ValueError("sampling_strategy='language_model' needs language_model=<LanguageModel or local dir>")
            self.model = language_model if isinstance(language_model, LanguageModel) else LanguageModel(language_model)
        else:
            self.nlp = load_nlp(nlp)
            if sampling_strategy == "similarity":
                if self.nlp.vocab.vectors.shape[0] == 0:
                    raise ValueError("sampling_strategy='similarity' needs a spaCy pipeline with word vectors")
                self._neighbors = Neighbors(self.nlp)
        self.meta = explainer_meta("AnchorText", {"sampling_strategy": sampling_strategy, "seed": seed,
                                                  **kind, **opts})

    @property
    def predict_fn(self) -> Callable[[Any], np.ndarray]:
        """Class labels of a list of texts (one str is a batch of one), as alibi's."""
        def predict(texts: Any) -> np.ndarray:
            return self.predictor([texts] if isinstance(texts, str) else list(texts))
        return predict

    @staticmethod
    def _validate_opts(o: dict) -> None:
        if not 0.0 <= float(o["sample_proba"]) <= 1.0:
            raise ValueError(f"sample_proba must be in [0, 1], got {o['sample_proba']}")
        if "top_n" in o and int(o["top_n"]) < 1:
            raise ValueError(f"top_n must be >= 1, got {o['top_n']}")
        if "temperature" in o and float(o["temperature"]) <= 0:
            raise ValueError(f"temperature must be > 0, got {o['temperature']}")
        if "filling" in o and o["filling"] not in ("parallel", "autoregressive"):
            raise ValueError(f"filling must be 'parallel' or 'autoregressive', got {o['filling']!r}")
        if "batch_size_lm" in o and int(o["batch_size_lm"]) < 1:
            raise ValueError(f"batch_size_lm must be >= 1, got {o['batch_size_lm']}")

    def _sampler(self, text: str) -> Any:
        o = self.perturb_opts
        if self.sampling_strategy == "unknown":
            return UnknownSampler(self.nlp(text), o["sample_proba"])
        if self.sampling_strategy == "similarity":
            return SimilaritySampler(self.nlp(text), self._neighbors, **o)
        return LanguageModelSampler(self.model, text, **o)

    def explain(self, text: str, threshold: float = 0.95, delta: float = 0.1, tau: float = 0.15,
                batch_size: int = 100, coverage_samples: int = 10000, beam_size: int = 1,
                stop_on_first: bool = True, max_anchor_size: int | None = None, min_samples_start: int = 100,
                n_covered_ex: int = 10, binary_cache_size: int = 10000, cache_margin: int = 1000,
                verbose: bool = False, verbose_every: int = 1, seed: int | None = None,
                lucb_arms: int | str | None = "auto",
                **kwargs: Any) -> Explanation:
        """Explain the prediction on ``text``; the anchor is a list of words."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("the text is empty")
        sampler = self._sampler(text)
        if sampler.n_features == 0:
            raise ValueError("the text has no word that can be perturbed")
        label = self.predictor([text])[0]
        sampler.label, sampler.predictor = label, self.predictor
        result, params = search_with_call_knobs(sampler, self.seed, locals())
        raw = dict(result)
        if isinstance(sampler, LanguageModelSampler):
            raw["positions"] = [int(sampler.ids_sample[f]) for f in result["feature"]]
            raw["names"] = [self.model.select_word(sampler.head_tokens, p, sampler.punctuation)
                            for p in raw["positions"]]
        else:
            raw["names"] = [sampler.words[f] for f in result["feature"]]
            raw["positions"] = [sampler.positions[f] for f in result["feature"]]
        raw["instance"] = text
        raw["instances"] = [text]
        raw["prediction"] = np.array([label])
        precision, coverage = summary_precision_coverage(result)
        data = dict(anchor=list(raw["names"]), precision=precision, coverage=coverage, raw=raw)
        meta = copy.deepcopy(self.meta)
        meta["params"].update(params)
        return Explanation(meta=meta, data=data)


__all__ = ["AnchorText", "LanguageModel", "UnknownSampler", "SimilaritySampler", "LanguageModelSampler",
           "Neighbors", "load_nlp", "SAMPLING_STRATEGIES"]

