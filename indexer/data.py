"""Dataset readers for builds: .npy/.npz arrays, a folder of images, CSV, JSONL text, iterables of batches.

Every reader yields :class:`Batch` objects in one fixed order, so that chunk ``i`` of a build
always holds the same examples (resume and the Ray engine rely on it). File-based readers are
random access (``batch(start, stop)``); an iterable of batches from Python is read sequentially.
Each example carries a ``payload_ref`` (a small JSON string) from which :func:`load_payload`
returns the stored example later (GetExamples), without copying the data into the catalog.
"""

from __future__ import annotations

import csv
import functools
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexer.errors import ConfigError

FORMATS = ("npy", "npz", "images", "csv", "jsonl", "text")
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class Batch:
    """A batch of examples with their metadata (lists have one entry per example)."""

    X: Any
    Y: np.ndarray | None = None
    ids: list[str] | None = None
    payload_refs: list[str | None] | None = None
    split: str | None = None
    source: str | None = None

    def __len__(self) -> int:
        return len(self.X)


def check_data_section(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Validate the ``[data]`` table (keys, format, files exist); return it with absolute paths."""
    fmt = data.get("format")
    if fmt is None and isinstance(data.get("path"), str):
        suffix = Path(data["path"]).suffix.lstrip(".")
        fmt = suffix if suffix in FORMATS else ("text" if suffix == "txt" else
                                                ("images" if (base / data["path"]).is_dir() else None))
    if fmt not in FORMATS:
        raise ConfigError("data.format", f"{fmt!r} is unknown: use one of {', '.join(FORMATS)}.")
    data["format"] = fmt
    if not isinstance(data.get("path"), str):
        raise ConfigError("data.path", "a dataset path is required.")
    p = (base / data["path"]).resolve()
    if not p.exists():
        raise ConfigError("data.path", f"file not found: {p}")
    if fmt == "images" and not p.is_dir():
        raise ConfigError("data.path", f"format 'images' needs a folder with one subfolder per class, got {p}.")
    data["path"] = str(p)
    if fmt == "npy" and "labels" in data:
        lp = (base / data["labels"]).resolve()
        if not lp.exists():
            raise ConfigError("data.labels", f"file not found: {lp}")
        data["labels"] = str(lp)
    if "preprocess" in data:
        mod = data["preprocess"].rsplit(":", 1)[0]
        if mod.endswith(".py"):
            fp = (base / mod).resolve()
            if not fp.exists():
                raise ConfigError("data.preprocess", f"file not found: {fp}")
            data["preprocess"] = f"{fp}:{data['preprocess'].rsplit(':', 1)[1]}"
    if fmt == "text":
        bs = data.setdefault("block_size", 0)
        if not isinstance(bs, int) or bs < 0:
            raise ConfigError("data.block_size", "must be a non-negative integer (0 = model.text.max_length).")
    lim = data.get("limit", 0)
    if not isinstance(lim, int) or lim < 0:
        raise ConfigError("data.limit", "must be a non-negative integer (0 = all).")
    return data


class ArrayDataset:
    """Random-access dataset over in-memory or memory-mapped arrays."""

    def __init__(self, X: Any, Y: np.ndarray | None = None, ids: list[str] | None = None,
                 payload: Callable[[int], str | None] | None = None, split: str | None = None,
                 source: str | None = None, transform: Callable[[Any], Any] | None = None) -> None:
        if Y is not None and len(Y) != len(X):
            raise ConfigError("data.y", f"{len(X)} inputs but {len(Y)} labels.")
        self.X, self.Y, self.ids, self.payload = X, Y, ids, payload
        self.split, self.source, self.transform = split, source, transform
        self.n = len(X)

    def __len__(self) -> int:
        return self.n

    def batch(self, start: int, stop: int) -> Batch:
        stop = min(stop, self.n)
        X = self.X[start:stop]
        X = self.transform(X) if self.transform else np.asarray(X)
        return Batch(X, None if self.Y is None else np.asarray(self.Y[start:stop]),
                     [str(i) for i in self.ids[start:stop]] if self.ids is not None else [str(i) for i in range(start, stop)],
                     [self.payload(i) if self.payload else None for i in range(start, stop)], self.split, self.source)

    def iter_batches(self, chunk_size: int, skip: set[int] = frozenset()) -> Iterator[tuple[int, Batch]]:
        """(chunk number, batch) for every chunk not in ``skip``."""
        for c, s in enumerate(range(0, self.n, chunk_size)):
            if c not in skip:
                yield c, self.batch(s, s + chunk_size)

    def n_chunks(self, chunk_size: int) -> int:
        return (self.n + chunk_size - 1) // chunk_size


class IterableDataset:
    """Sequential dataset over an iterable of batches from Python: ``(X, Y)`` tuples, dicts or :class:`Batch`.

    Re-chunked to the build's chunk size. Resume re-reads the iterable and skips committed chunks,
    so pass something iterable more than once (a list, or a callable returning a fresh iterator).
    """

    def __init__(self, source: Iterable[Any] | Callable[[], Iterable[Any]], n: int | None = None) -> None:
        self.source = source
        self.n = n

    def __len__(self) -> int:
        if self.n is None:
            raise TypeError("length unknown for an iterable dataset")
        return self.n

    def _batches(self) -> Iterator[Batch]:
        it = self.source() if callable(self.source) else self.source
        for b in it:
            if isinstance(b, Batch):
                yield b
            elif isinstance(b, dict):
                yield Batch(np.asarray(b["X"]), None if b.get("Y") is None else np.asarray(b["Y"]), b.get("ids"),
                            b.get("payload_refs"), b.get("split"), b.get("source"))
            elif isinstance(b, (tuple, list)) and len(b) == 2:
                yield Batch(np.asarray(b[0]), None if b[1] is None else np.asarray(b[1]))
            else:
                yield Batch(np.asarray(b))

    def iter_batches(self, chunk_size: int, skip: set[int] = frozenset()) -> Iterator[tuple[int, Batch]]:
        buf: list[Batch] = []
        have, pos, chunk = 0, 0, 0
        for b in self._batches():
            buf.append(b)
            have += len(b)
            while have >= chunk_size:
                out, buf, have = _take(buf, chunk_size, pos)
                if chunk not in skip:
                    yield chunk, out
                chunk += 1
                pos += chunk_size
        if have:
            out, _, _ = _take(buf, have, pos)
            if chunk not in skip:
                yield chunk, out

    def n_chunks(self, chunk_size: int) -> int | None:
        return None if self.n is None else (self.n + chunk_size - 1) // chunk_size


def _take(buf: list[Batch], k: int, pos: int) -> tuple[Batch, list[Batch], int]:
    """First k examples of the buffered batches, and the rest."""
    Xs, Ys, ids, refs, rest, got = [], [], [], [], [], 0
    split = source = None
    for b in buf:
        if got >= k:
            rest.append(b)
            continue
        t = min(k - got, len(b))
        Xs.append(b.X[:t])
        Ys.append(None if b.Y is None else b.Y[:t])
        ids.extend(b.ids[:t] if b.ids is not None else [str(pos + got + i) for i in range(t)])
        refs.extend(b.payload_refs[:t] if b.payload_refs is not None else [None] * t)
        split, source = split or b.split, source or b.source
        if t < len(b):
            rest.append(Batch(b.X[t:], None if b.Y is None else b.Y[t:], None if b.ids is None else b.ids[t:],
                              None if b.payload_refs is None else b.payload_refs[t:], b.split, b.source))
        got += t
    Y = None if any(y is None for y in Ys) else np.concatenate(Ys)
    out = Batch(np.concatenate(Xs), Y, ids, refs, split, source)
    return out, rest, sum(len(b) for b in rest)


def _labels_to_int(values: list[Any], class_names: list[str] | None, fld: str) -> np.ndarray:
    """Map label strings through class_names (or parse integers)."""
    out = []
    for v in values:
        if class_names is not None and str(v) in class_names:
            out.append(class_names.index(str(v)))
            continue
        try:
            out.append(int(v))
        except (TypeError, ValueError):
            raise ConfigError(fld, f"label {v!r} is neither an integer nor one of model.class_names.") from None
    return np.asarray(out, dtype=np.int64)


def open_dataset(data: dict[str, Any], task: str = "classification", class_names: list[str] | None = None
                 ) -> ArrayDataset:
    """Open the dataset a (checked) ``[data]`` table describes (text tokenized by a Hugging Face model's
    own tokenizer: :func:`indexer.text_data.open_build_dataset`)."""
    fmt, path = data["format"], data["path"]
    if fmt == "text":
        raise ConfigError("data.format", "format 'text' needs a Hugging Face causal LM (model.hf_dir).")
    limit = data.get("limit") or None
    split = data.get("split", "train")
    src = path
    if fmt in ("npy", "npz"):
        if fmt == "npy":
            X = np.load(path, mmap_mode="r")
            Y = np.load(data["labels"], mmap_mode="r") if "labels" in data else None
            ids = None
            key = None
        else:
            z = np.load(path)
            key = data.get("x", "X")
            if key not in z.files:
                raise ConfigError("data.x", f"array {key!r} not in {path} (has {', '.join(z.files)}).")
            X = z[key]
            ykey = data.get("y", "y" if "y" in z.files else None)
            if ykey is not None and ykey not in z.files:
                raise ConfigError("data.y", f"array {ykey!r} not in {path} (has {', '.join(z.files)}).")
            Y = z[ykey] if ykey else None
            ids = [str(v) for v in z[data["ids"]]] if data.get("ids") else None
        if Y is not None and task == "classification" and Y.dtype.kind in "UOS":
            Y = _labels_to_int(list(Y), class_names, "data.y")
        if limit:
            X, Y = X[:limit], None if Y is None else Y[:limit]
            ids = None if ids is None else ids[:limit]
        payload = (lambda i, p=path, k=key: json.dumps({"t": fmt, "path": p, "key": k, "row": i}))
        return ArrayDataset(X, Y, ids, payload, split, src)
    if fmt == "images":
        root = Path(path)
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not classes:
            raise ConfigError("data.path", f"{root} has no class subfolders.")
        files, labels = [], []
        for c in classes:
            for f in sorted((root / c).rglob("*")):
                if f.suffix.lower() in IMAGE_EXT:
                    files.append(str(f))
                    labels.append(c)
        if not files:
            raise ConfigError("data.path", f"no images ({', '.join(IMAGE_EXT)}) under {root}.")
        Y = _labels_to_int(labels, class_names, "data.path") if class_names else np.asarray(
            [classes.index(c) for c in labels], dtype=np.int64)
        if limit:
            files, Y = files[:limit], Y[:limit]
        size, mode = data.get("size"), data.get("mode", "L")
        layout, scale = data.get("layout", "nchw"), float(data.get("scale", 255.0))

        def load(fs: list[str]) -> np.ndarray:
            from PIL import Image

            arrs = []
            for f in fs:
                im = Image.open(f).convert(mode)
                if size:
                    im = im.resize((int(size[1]), int(size[0])))
                a = np.asarray(im, dtype=np.float32) / scale
                a = a[..., None] if a.ndim == 2 else a
                arrs.append(a.transpose(2, 0, 1) if layout == "nchw" else a)
            shapes = {a.shape for a in arrs}
            if len(shapes) > 1:
                raise ConfigError("data.size", f"images have different shapes {sorted(shapes)}: set data.size = [H, W].")
            return np.stack(arrs)

        rel = [str(Path(f).relative_to(root)) for f in files]
        payload = (lambda i: json.dumps({"t": "image", "path": files[i], "mode": mode, "size": size,
                                         "layout": layout, "scale": scale}))
        return ArrayDataset(files, Y, rel, payload, split, src, transform=load)
    if fmt == "csv":
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
        if len(rows) < 2:
            raise ConfigError("data.path", f"{path} has no data rows under its header.")
        header, body = rows[0], rows[1:]
        label = data.get("label")
        if label is not None and label not in header:
            raise ConfigError("data.label", f"column {label!r} not in the header ({', '.join(header)}).")
        feats = data.get("features") or [h for h in header if h != label and h != data.get("ids")]
        for f in feats:
            if f not in header:
                raise ConfigError("data.features", f"column {f!r} not in the header.")
        fi = [header.index(f) for f in feats]
        try:
            X = np.asarray([[float(r[i]) if r[i] != "" else np.nan for i in fi] for r in body], dtype=np.float32)
        except (ValueError, IndexError) as exc:
            raise ConfigError("data.features", f"non-numeric or missing feature value: {exc}") from exc
        Y = None
        if label is not None:
            li = header.index(label)
            vals = [r[li] for r in body]
            Y = _labels_to_int(vals, class_names, "data.label") if task == "classification" else np.asarray(
                vals, dtype=np.float32)
        ids = [r[header.index(data["ids"])] for r in body] if data.get("ids") else None
        if limit:
            X, Y, ids = X[:limit], None if Y is None else Y[:limit], None if ids is None else ids[:limit]
        payload = (lambda i: json.dumps({"t": "csv", "path": path, "row": i, "features": feats}))
        return ArrayDataset(X, Y, ids, payload, split, src)
    # jsonl
    from indexer.entries import load_entry

    texts, labels, ids = read_jsonl_texts(path, data.get("text_field", "text"), data.get("label_field", "label"),
                                          data.get("id_field"))
    if limit:
        texts, labels, ids = texts[:limit], labels[:limit], ids[:limit]
    Y = record_labels(labels, task, class_names)
    pre = load_entry(data["preprocess"], "data.preprocess")
    lines = list(ids)
    payload = (lambda i: json.dumps({"t": "jsonl", "path": path, "text": texts[i], "line": lines[i]}))
    return ArrayDataset(texts, Y, ids, payload, split, src, transform=lambda xs: np.asarray(pre(list(xs))))


@functools.lru_cache(maxsize=16)
def _array(path: str, fmt: str, key: str | None) -> np.ndarray:
    if fmt == "npy":
        return np.load(path, mmap_mode="r")
    return np.load(path)[key]


def load_payload(ref: str | None) -> np.ndarray | None:
    """The stored example a ``payload_ref`` points at (None when there is none)."""
    if not ref:
        return None
    r = json.loads(ref)
    t = r["t"]
    if t in ("npy", "npz"):
        return np.array(_array(r["path"], t, r.get("key"))[r["row"]])
    if t == "image":
        from PIL import Image

        im = Image.open(r["path"]).convert(r["mode"])
        if r.get("size"):
            im = im.resize((int(r["size"][1]), int(r["size"][0])))
        a = np.asarray(im, dtype=np.float32) / r["scale"]
        a = a[..., None] if a.ndim == 2 else a
        return a.transpose(2, 0, 1) if r["layout"] == "nchw" else a
    if t == "csv":
        with open(r["path"], newline="") as fh:
            rows = list(csv.reader(fh))
        header, row = rows[0], rows[1 + r["row"]]
        return np.asarray([float(row[header.index(f)]) for f in r["features"]], dtype=np.float32)
    if t == "jsonl":
        return np.asarray(r["text"])
    if t == "inline":
        return np.asarray(r["value"])
    raise ValueError(f"unknown payload kind {t!r}")


def validate_arrays(ds: ArrayDataset | IterableDataset, chunk_size: int, n_classes: int | None,
                    task: str, max_rows: int | None = None) -> int:
    """Scan the data for NaN/inf inputs and out-of-range labels before any gradient is computed.

    Returns the number of rows seen. Raises ConfigError naming the field and the first bad row.
    """
    seen = 0
    for c, b in ds.iter_batches(chunk_size):
        X = b.X
        if isinstance(X, np.ndarray) and np.issubdtype(X.dtype, np.floating):
            bad = ~np.isfinite(X.reshape(len(X), -1)).all(axis=1)
            if bad.any():
                raise ConfigError("data.x", f"example {seen + int(np.argmax(bad))} contains NaN or infinite values.")
        if b.Y is not None:
            Y = np.asarray(b.Y)
            if task == "classification" and n_classes is not None:
                if Y.dtype.kind == "f" and not np.all(Y == np.round(Y)):
                    raise ConfigError("data.y", "classification labels must be integers.")
                out = (Y < 0) | (Y >= n_classes)
                if Y.ndim > 1:  # per-token labels: -100 marks the tokens the loss ignores
                    out &= Y != -100
                if out.any():
                    i = int(np.argmax(out.reshape(len(Y), -1).any(axis=1)))
                    raise ConfigError("data.y", f"label {Y[i]!r} of example {seen + i} is out of range "
                                                f"[0, {n_classes}) for a model with {n_classes} outputs.")
            elif Y.dtype.kind == "f" and not np.all(np.isfinite(Y)):
                raise ConfigError("data.y", "targets contain NaN or infinite values.")
        seen += len(b)
        if max_rows is not None and seen >= max_rows:
            break
    return seen


__all__ = ["Batch", "ArrayDataset", "IterableDataset", "open_dataset", "load_payload", "validate_arrays",
           "record_labels", "iter_jsonl",
           "check_data_section", "FORMATS"]


def record_labels(labels: list[Any], task: str, class_names: list[str] | None) -> np.ndarray | None:
    """The targets of per-record labels (None where no record has one): class ids for classification
    (names through ``class_names``), float32 values for regression; a mix of labelled and unlabelled
    records is a ConfigError."""
    if all(v is None for v in labels):
        return None
    if any(v is None for v in labels):
        raise ConfigError("data.label_field", "some examples have a label and some do not.")
    if task == "classification":
        return _labels_to_int(labels, class_names, "data.label_field")
    return np.asarray(labels, dtype=np.float32)


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(0-based line number, record) of each non-blank line of a JSONL file; a line that is not JSON
    is a ConfigError naming it (line numbers are what example ids default to)."""
    with open(path) as fh:
        for ln, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError("data.path", f"line {ln + 1} of {path} is not JSON: {exc}") from exc
            yield ln, rec


def read_jsonl_texts(path: str | Path, tf: str, lf: str | None, idf: str | None
                     ) -> tuple[list[str], list[Any], list[str]]:
    """Texts, labels (None where absent or no label field) and ids (the id field, else the line
    number) of a JSONL file; a line that is not JSON or lacks the text field is a ConfigError."""
    texts, labels, ids = [], [], []
    for ln, rec in iter_jsonl(path):
        if tf not in rec:
            raise ConfigError("data.text_field", f"line {ln + 1} has no field {tf!r}.")
        texts.append(str(rec[tf]))
        labels.append(rec.get(lf) if lf else None)
        ids.append(str(rec[idf]) if idf and idf in rec else str(ln))
    return texts, labels, ids
