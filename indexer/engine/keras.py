"""TensorFlow/Keras adapter of the gradient engine: per-example gradients from one batched tape.

Measured on this CPU (benchmarks/bench_gradients.py): ``GradientTape.jacobian`` is unusable (≈14 examples/s),
``tf.vectorized_map`` reaches ≈830, one batched backward ≈2,600. The per-layer factors reach the
batched speed: each supported layer (Dense, Conv1D/Conv2D, Embedding, BatchNormalization in
inference) has its ``call`` wrapped while the engine runs, so its input and pre-activation output
are recorded on the tape; one ``tape.gradient`` of the summed per-example losses w.r.t. those outputs
gives every example's output gradient, and the per-example weight gradient is formed from the two.
Layers without a rule fall back to ``tf.vectorized_map``, announced once.

Keras losses are called as Keras users write them: ``loss_fn(y_true, y_pred)``.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from indexer.defaults import CHUNK_SIZE
from indexer.engine.base import Block, GradientEngine, WarnOnce, select_names

keras = tf.keras


def _layers(model: Any) -> list[Any]:
    """All layers of a model, nested models flattened, in order."""
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model) or (hasattr(layer, "layers") and layer.layers):
            out.extend(_layers(layer))
        else:
            out.append(layer)
    return out


def _kind(layer: Any) -> str | None:
    L = keras.layers
    if isinstance(layer, L.Dense):
        return "dense"
    if isinstance(layer, (L.Conv2D, L.Conv1D)) and not isinstance(layer, (L.Conv2DTranspose, L.Conv1DTranspose,
                                                                            L.DepthwiseConv2D, L.SeparableConv2D)):
        if getattr(layer, "groups", 1) == 1 and layer.data_format == "channels_last":
            return "conv"
        return None
    if isinstance(layer, L.Embedding):
        return "embedding"
    if isinstance(layer, L.BatchNormalization):
        axis = layer.axis if isinstance(layer.axis, int) else (layer.axis[0] if len(layer.axis) == 1 else None)
        return "bn" if axis in (-1,) or axis is not None else None
    return None


class KerasEngine(GradientEngine):
    """Per-example gradients of a ``keras.Model``'s loss with ``training=False``, chunk by chunk."""

    framework = "tensorflow"
    _lock = threading.Lock()  # wrapped layer calls are per model; serialize engines that share one

    def __init__(self, model: Any, loss_fn: Any, task: str = "classification",
                 params: Sequence[str] | str | None = None, chunk_size: int = CHUNK_SIZE) -> None:
        if not isinstance(model, keras.Model):
            raise TypeError(f"backend='tensorflow' needs a tf.keras.Model, got {type(model).__name__}.")
        self.model = model
        self.loss_fn = loss_fn
        self.task = task
        self.chunk_size = int(chunk_size)
        weights = list(model.trainable_weights)
        if not weights:
            raise ValueError("No weight of the model is trainable: set layer.trainable = True on the layers "
                             "whose gradients you want.")
        names = [w.path for w in weights]
        frozen = [w for w in model.non_trainable_weights if "moving_" not in w.path]
        by_layer = {id(layer): [w.path for w in layer.weights] for layer in _layers(model)}
        chosen = set(select_names(names, params, by_layer))
        if not chosen:
            raise ValueError(f"No trainable weight matches params={params!r}; trainable ones are: "
                             f"{', '.join(names[:20])}{' ...' if len(names) > 20 else ''}.")
        if frozen:
            warnings.warn(f"{len(frozen)} frozen (non-trainable) weight tensor(s) are excluded from the gradients.",
                          UserWarning, stacklevel=3)
        self._weights = {w.path: w for w in weights if w.path in chosen}
        self.param_names = [n for n in names if n in chosen]
        self.param_sizes = [int(np.prod(self._weights[n].shape)) for n in self.param_names]
        self.dtype = tf.as_dtype(self._weights[self.param_names[0]].dtype)
        self._hooked: list[tuple[Any, str]] = []
        self._fallback: list[str] = []
        for layer in _layers(model):
            own = [w.path for w in layer.trainable_weights if w.path in chosen]
            if not own:
                continue
            kind = _kind(layer)
            if kind is None:
                self._fallback.extend(own)
            else:
                self._hooked.append((layer, kind))
        self._warn_fallback = WarnOnce()
        try:
            self._in_dtype = tf.as_dtype(model.inputs[0].dtype)
        except Exception:
            self._in_dtype = self.dtype
        self._logits_binary = False

    # -------------------------------------------------------------- helpers
    def _to_x(self, X: np.ndarray) -> tf.Tensor:
        X = np.asarray(X)
        if np.issubdtype(X.dtype, np.floating):
            return tf.convert_to_tensor(X, dtype=self._in_dtype if self._in_dtype.is_floating else self.dtype)
        return tf.convert_to_tensor(X)

    def _to_y(self, Y: np.ndarray | None) -> tf.Tensor | None:
        if Y is None:
            return None
        Y = np.asarray(Y)
        if np.issubdtype(Y.dtype, np.floating):
            return tf.convert_to_tensor(Y, dtype=self.dtype)
        return tf.convert_to_tensor(Y)

    def parameter_arrays(self) -> list[np.ndarray]:
        return [np.asarray(self._weights[n].numpy()) for n in self.param_names]

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.model(self._to_x(X), training=False))

    def per_example_loss(self, out: tf.Tensor, y: tf.Tensor | None) -> tf.Tensor:
        """Loss per example (n,), whatever reduction the user's loss applies."""
        n = tf.shape(out)[0]
        if self.loss_fn is None:
            L = out
        elif isinstance(self.loss_fn, keras.losses.Loss) and hasattr(self.loss_fn, "fn"):
            # A Keras loss object: its wrapped function gives per-example values, before reduction,
            # in the inputs' dtype (no vectorized_map needed).
            L = self.loss_fn.fn(y, out, **getattr(self.loss_fn, "_fn_kwargs", {}))
        else:
            L = self.loss_fn(y, out)
        L = tf.convert_to_tensor(L)
        if L.shape.rank and L.shape.rank >= 1:
            return tf.reshape(L, [n, -1])[:, 0] if L.shape.rank == 1 else tf.reduce_sum(tf.reshape(L, [n, -1]), 1)
        if y is None:
            return tf.vectorized_map(lambda o: self.loss_fn(None, o[None]), out)
        return tf.vectorized_map(lambda args: tf.reshape(self.loss_fn(args[0][None], args[1][None]), []), (y, out))

    # ---------------------------------------------------------------- blocks
    def _forward(self, x: tf.Tensor, y: tf.Tensor | None) -> tuple[tf.Tensor, list, list]:
        """Forward with recording wrappers; returns per-example losses, records and output gradients."""
        records: list[tuple[Any, str, tf.Tensor, tf.Tensor]] = []
        originals = []
        with tf.GradientTape(persistent=False) as tape:
            for layer, kind in self._hooked:
                orig = layer.call
                originals.append((layer, orig))
                layer.call = self._wrap(layer, kind, orig, tape, records)
            try:
                out = self.model(x, training=False)
            finally:
                for layer, orig in originals:
                    del layer.call
                    if layer.call != orig:  # the instance attribute shadowed a class method
                        layer.call = orig
            L = self.per_example_loss(out, y)
            total = tf.reduce_sum(L)
        zs = [r[3] for r in records]
        grads = tape.gradient(total, zs, unconnected_gradients=tf.UnconnectedGradients.ZERO) if zs else []
        return L, records, grads

    @staticmethod
    def _wrap(layer: Any, kind: str, orig: Any, tape: tf.GradientTape, records: list):
        def wrapped(inputs, *args, **kwargs):
            act = getattr(layer, "activation", None) if kind in ("dense", "conv") else None
            if act is not None:
                layer.activation = None
            try:
                z = orig(inputs, *args, **kwargs)
            finally:
                if act is not None:
                    layer.activation = act
            tape.watch(z)
            records.append((layer, kind, inputs, z))
            return act(z) if act is not None else z
        return wrapped

    def _inputs_and_grads(self, x: tf.Tensor, y: tf.Tensor | None) -> tuple[list, list]:
        """Traced once per input signature: the hooked layers' inputs and output gradients."""
        _, records, gz = self._forward(x, y)
        self._trace_layers = [(r[0], r[1]) for r in records]  # static: the same order in every trace
        return [tf.convert_to_tensor(r[2]) for r in records], list(gz)

    @property
    def _graph_fn(self):
        # Compiled with tf.function: eager dispatch of the forward/backward ops cost more than the math.
        if getattr(self, "_compiled", None) is None:
            self._compiled = tf.function(self._inputs_and_grads, reduce_retracing=True)
        return self._compiled

    def _chunk_blocks(self, X: np.ndarray, Y: np.ndarray | None) -> list[Block]:
        x, y = self._to_x(X), self._to_y(Y)
        with self._lock:
            inputs, gz = self._graph_fn(x, y)
        per_layer: dict[int, list] = {}
        for (layer, kind), inp, g in zip(self._trace_layers, inputs, gz):
            per_layer.setdefault(id(layer), [layer, kind, []])[2].append((inp, g))
        blocks = [self._layer_block(layer, kind, calls) for layer, kind, calls in per_layer.values()]
        if self._fallback:
            blocks.append(self._fallback_block(x, y))
        return blocks

    def _parts(self, layer: Any, attrs: Sequence[str]) -> tuple[list[tuple[str, int]], list[bool]]:
        parts, present = [], []
        for a in attrs:
            w = getattr(layer, a, None)
            ok = w is not None and getattr(w, "path", None) in self._weights
            present.append(ok)
            if ok:
                parts.append((w.path, int(np.prod(w.shape))))
        return parts, present

    def _layer_block(self, layer: Any, kind: str, calls: list) -> Block:
        if kind in ("dense", "conv"):
            parts, (has_w, has_b) = self._parts(layer, ("kernel", "bias"))
            pairs = [self._factors(layer, kind, tf.convert_to_tensor(inp), g) for inp, g in calls]
            a = tf.concat([p[0] for p in pairs], axis=1) if len(pairs) > 1 else pairs[0][0]
            d = tf.concat([p[1] for p in pairs], axis=1) if len(pairs) > 1 else pairs[0][1]
            return Block(layer.name, "outer", parts, a_in=a.numpy(), d=d.numpy(), layout="in_out",
                         has_bias=has_b, has_weight=has_w)
        if kind == "embedding":
            parts, _ = self._parts(layer, ("embeddings",))
            V, dim = layer.embeddings.shape
            full = None
            for inp, g in calls:
                n = tf.shape(g)[0]
                idx = tf.reshape(tf.cast(inp, tf.int32), [n, -1])
                oh = tf.one_hot(idx, int(V), dtype=g.dtype)  # (n, L, V)
                rows = tf.reshape(tf.einsum("nlv,nld->nvd", oh, tf.reshape(g, [n, -1, int(dim)])), [n, -1])
                full = rows if full is None else full + rows
            return Block(layer.name, "full", parts, full=full.numpy())
        # batch normalization, inference statistics
        parts, (has_g, has_b) = self._parts(layer, ("gamma", "beta"))
        full = None
        for inp, g in calls:
            inp = tf.cast(tf.convert_to_tensor(inp), g.dtype)
            xhat = (inp - tf.cast(layer.moving_mean, g.dtype)) / tf.sqrt(
                tf.cast(layer.moving_variance, g.dtype) + layer.epsilon)
            n = tf.shape(g)[0]
            c = int(g.shape[-1])
            pieces = []
            if has_g:
                pieces.append(tf.reduce_sum(tf.reshape(g * xhat, [n, -1, c]), 1))
            if has_b:
                pieces.append(tf.reduce_sum(tf.reshape(g, [n, -1, c]), 1))
            rows = tf.concat(pieces, axis=1)
            full = rows if full is None else full + rows
        return Block(layer.name, "full", parts, full=full.numpy())

    @staticmethod
    def _factors(layer: Any, kind: str, inp: tf.Tensor, g: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(a, d) with shapes (n, L, din), (n, L, dout)."""
        n = tf.shape(inp)[0]
        inp = tf.cast(inp, g.dtype)
        if kind == "dense":
            return tf.reshape(inp, [n, -1, inp.shape[-1]]), tf.reshape(g, [n, -1, g.shape[-1]])
        conv1d = len(layer.kernel.shape) == 3
        if conv1d:
            inp = inp[:, None]
            k, s, r = (1, layer.kernel_size[0]), (1, layer.strides[0]), (1, layer.dilation_rate[0])
        else:
            k, s, r = tuple(layer.kernel_size), tuple(layer.strides), tuple(layer.dilation_rate)
        padding = layer.padding.upper()
        if padding == "CAUSAL":
            inp = tf.pad(inp, [[0, 0], [0, 0], [r[1] * (k[1] - 1), 0], [0, 0]])
            padding = "VALID"
        cin = int(inp.shape[-1])
        if k[0] == 1 and k[1] == 1 and s == (1, 1):
            patches = inp
        else:
            patches = tf.image.extract_patches(inp, sizes=[1, k[0], k[1], 1], strides=[1, s[0], s[1], 1],
                                               rates=[1, r[0], r[1], 1], padding=padding)
        a = tf.reshape(patches, [n, -1, k[0] * k[1] * cin])
        return a, tf.reshape(g, [n, -1, g.shape[-1]])

    def _fallback_block(self, x: tf.Tensor, y: tf.Tensor | None) -> Block:
        """Per-example gradients of weights in layers without a rule, via tf.vectorized_map."""
        names = self._fallback
        self._warn_fallback(
            f"gradindex: no vectorized rule for the layers owning {', '.join(names[:5])}"
            f"{' ...' if len(names) > 5 else ''}; using tf.vectorized_map for them (slower).")
        ws = [self._weights[n] for n in names]

        def one(args):
            xi = args[0][None]
            yi = None if y is None else args[1][None]
            with tf.GradientTape() as tape:
                L = tf.reduce_sum(self.per_example_loss(self.model(xi, training=False), yi))
            gs = tape.gradient(L, ws, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return tf.concat([tf.reshape(tf.convert_to_tensor(g), [-1]) for g in gs], 0)

        elems = (x,) if y is None else (x, y)
        try:
            rows = tf.vectorized_map(one, elems)
        except Exception:
            rows = tf.stack([one(tuple(e[i] for e in elems)) for i in range(int(x.shape[0]))])
        parts = [(n, int(np.prod(self._weights[n].shape))) for n in names]
        return Block("<fallback>", "full", parts, full=rows.numpy())
