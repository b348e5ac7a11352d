"""Per-example loss conventions for sequence models, for the gradient engine.

The engine differentiates one loss per example. For a sequence the example is the whole sequence,
and its loss is the mean (or sum) of its token losses over the tokens that count: padding and
positions labelled ``ignore_index`` (-100, the Hugging Face convention) contribute nothing, so a
padded sequence has exactly the gradient of the same sequence without padding (given an attention
mask that hides the padding from the other tokens). Each factory returns a callable with the
framework's argument order, giving a vector of per-example losses (n,):

- :func:`causal_lm_loss`: next-token prediction; logits (n, T, V), labels (n, T) (the input ids with
  -100 at padding); position t predicts label t+1 (``shift=True``, as Hugging Face's LM heads).
- :func:`token_classification_loss`: one label per token; logits (n, T, C), labels (n, T), -100 ignored.
- :func:`sequence_classification_loss`: one label per sequence; logits (n, C), labels (n,).

``reduction="mean"`` divides each sequence's summed token loss by its own number of counted tokens
(a sequence with none scores 0); ``"sum"`` does not divide. Example (PyTorch)::

    eng = make_engine(model, causal_lm_loss("mean"), task="classification")
    G = eng.grads(ids, np.where(ids == pad_id, -100, ids))

Keras: the same names with the prefix ``keras_`` take ``(labels, logits)``.
"""

from __future__ import annotations

from typing import Any, Callable

IGNORE_INDEX = -100


def _check(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' (per sequence), got {reduction!r}.")


def _torch_token_loss(logits: Any, labels: Any, reduction: str, ignore_index: int) -> Any:
    import torch
    from torch.nn import functional as F

    n, T, V = logits.shape
    labels = labels.long()
    mask = labels != ignore_index
    tok = F.cross_entropy(logits.reshape(n * T, V), torch.where(mask, labels, 0).reshape(-1),
                          reduction="none").reshape(n, T)
    tot = (tok * mask.to(tok.dtype)).sum(1)
    if reduction == "sum":
        return tot
    return tot / mask.sum(1).clamp(min=1).to(tot.dtype)


def causal_lm_loss(reduction: str = "mean", ignore_index: int = IGNORE_INDEX, shift: bool = True) -> Callable:
    """Per-sequence next-token loss ``loss(logits (n,T,V), labels (n,T)) -> (n,)`` for PyTorch."""
    _check(reduction)

    def loss(logits: Any, labels: Any) -> Any:
        if shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        return _torch_token_loss(logits, labels, reduction, ignore_index)

    return loss


def token_classification_loss(reduction: str = "mean", ignore_index: int = IGNORE_INDEX) -> Callable:
    """Per-sequence token-classification loss ``loss(logits (n,T,C), labels (n,T)) -> (n,)`` for PyTorch."""
    _check(reduction)
    return lambda logits, labels: _torch_token_loss(logits, labels, reduction, ignore_index)


def sequence_classification_loss() -> Callable:
    """Per-sequence cross-entropy ``loss(logits (n,C), labels (n,)) -> (n,)`` for PyTorch."""
    from torch.nn import functional as F

    return lambda logits, labels: F.cross_entropy(logits, labels.long(), reduction="none")


def _keras_token_loss(labels: Any, logits: Any, reduction: str, ignore_index: int) -> Any:
    import tensorflow as tf

    labels = tf.cast(labels, tf.int32)
    mask = tf.not_equal(labels, ignore_index)
    safe = tf.where(mask, labels, tf.zeros_like(labels))
    tok = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe, logits=logits)
    m = tf.cast(mask, tok.dtype)
    tot = tf.reduce_sum(tok * m, axis=1)
    if reduction == "sum":
        return tot
    return tot / tf.maximum(tf.reduce_sum(m, axis=1), 1.0)


def keras_causal_lm_loss(reduction: str = "mean", ignore_index: int = IGNORE_INDEX, shift: bool = True) -> Callable:
    """Keras version of :func:`causal_lm_loss`: ``loss(labels, logits) -> (n,)``."""
    _check(reduction)

    def loss(labels: Any, logits: Any) -> Any:
        if shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        return _keras_token_loss(labels, logits, reduction, ignore_index)

    return loss


def keras_token_classification_loss(reduction: str = "mean", ignore_index: int = IGNORE_INDEX) -> Callable:
    """Keras version of :func:`token_classification_loss`: ``loss(labels, logits) -> (n,)``."""
    _check(reduction)
    return lambda labels, logits: _keras_token_loss(labels, logits, reduction, ignore_index)


__all__ = ["causal_lm_loss", "token_classification_loss", "sequence_classification_loss", "keras_causal_lm_loss",
           "keras_token_classification_loss", "IGNORE_INDEX"]
