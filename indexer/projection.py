"""Seeded random projections of per-example gradients, dense-blockwise, factored or sketched.

Why: a model's gradient has from thousands to billions of entries; storing or searching it whole
does not scale. A Johnson–Lindenstrauss projection to k dimensions preserves inner products in
expectation (entries ±1/√k or N(0, 1/k): E[P Pᵀ] = I), so projected scores are directly
comparable with unprojected ones.

The projection matrix P (D × k, D = number of selected parameters in the engine's flat order) is
never held whole. It is *defined* row-block by row-block: rows [j·R, (j+1)·R) come from numpy's
PCG64 seeded with ``SeedSequence([seed, 0, j])`` (R = ``block_rows``, recorded in the spec), so any
machine, thread count or batch size regenerates exactly the same bits, and memory stays at R × k
floats whatever D is. (TRAK's CUDA projector seeds by the GPU's SM count: an index built on one
GPU does not match queries on another. Ours has no such dependence.)

``kind="factored"`` (the Kronecker / LoGra form): for a Linear/Conv block whose per-example
gradient is Σ_l d_l a_lᵀ (``Block.kind == "outer"``), P_b = P_out ⊗ P_in with P_in (din × k_in),
P_out (dout × k_out), k_in · k_out = k, so the projected gradient is Σ_l (P_outᵀ d_l)(P_inᵀ a_l)ᵀ:
the cost is n·L·(din·k_in + dout·k_out + k), never din·dout·k, and the (dout × din) gradient is
never formed. Blocks not larger than k (and ``full`` blocks) use the dense rows of P. Every block
lands in the same k dimensions (summed), exactly as a dense JL projection of the whole gradient.
The factored map is still JL-normalized (E[P_b P_bᵀ] = I) but has a larger variance than a dense
one of the same k (a product of two JL estimates); the build benchmark measures both.

``kind="sketch"`` (TensorSketch, Pham & Pagh 2013): also works on the factors without forming the
gradient, but keeps the fidelity of a full-size sketch. CountSketch each factor (hash to one of k
buckets with a random sign, seeded per block like the matrices above), and combine by circular
convolution (FFT): Σ_l IFFT(FFT(CS_out d_l) ∘ FFT(CS_in a_l)) is exactly the CountSketch of the
(dout × din) gradient under the hash (h_out + h_in) mod k, signs s_out·s_in. Unbiased (E⟨Sx, Sy⟩ =
⟨x, y⟩, so scores stay comparable) with variance of the order of a dense JL map of the same k, at
a cost n·L·(din + dout + k log k), used where that is cheaper than forming the gradient (e.g. a
Linear layer applied once). Other blocks are formed and CountSketched (a sparse JL map, O(size)
per example). ``dist`` is ignored (signs are Rademacher).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PROJECTION_KINDS = ("none", "dense", "factored", "sketch")
DISTRIBUTIONS = ("rademacher", "gaussian")


@dataclass(frozen=True)
class ProjectionSpec:
    """What defines a projection, stored in the catalog so that queries reproduce it bit for bit."""

    kind: str = "none"
    dim: int = 0
    dist: str = "rademacher"
    seed: int = 0
    block_rows: int = 1024
    version: int = 1

    def __post_init__(self) -> None:
        if self.kind not in PROJECTION_KINDS:
            raise ValueError(f"projection.kind {self.kind!r} is unknown: use one of {', '.join(PROJECTION_KINDS)}.")
        if self.dist not in DISTRIBUTIONS:
            raise ValueError(f"projection.dist {self.dist!r} is unknown: use one of {', '.join(DISTRIBUTIONS)}.")
        if self.kind != "none" and (not isinstance(self.dim, int) or self.dim <= 0):
            raise ValueError(f"projection.dim must be a positive integer for kind={self.kind!r}, got {self.dim!r}.")
        if self.block_rows <= 0 or self.block_rows % 8:
            raise ValueError("projection.block_rows must be a positive multiple of 8.")
        if not (0 <= int(self.seed) < 2**63):
            raise ValueError("projection.seed must be a non-negative integer below 2**63.")
        if self.kind == "factored":
            factor_dims(self.dim)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for the catalog."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProjectionSpec":
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: d[k] for k in ("kind", "dim", "dist", "seed", "block_rows", "version") if k in d})


def factor_dims(k: int) -> tuple[int, int]:
    """(k_out, k_in) with k_out · k_in = k and k_in the smallest divisor ≥ √k (inputs are usually wider)."""
    k_in = next(d for d in range(math.isqrt(k - 1) + 1 if k > 1 else 1, k + 1) if k % d == 0)
    k_out = k // k_in
    if k_out < 4:
        raise ValueError(f"projection.dim={k} has no balanced factorization k_out x k_in (got {k_out} x {k_in}); "
                         "use a dim such as 512 (16x32), 2048 (32x64) or 8192 (64x128) for kind='factored'.")
    return k_out, k_in


def ghost_sq_norms(blk: Any) -> np.ndarray | None:
    """Exact ‖Σ_t d_t a_tᵀ‖² per example from a sequence block's factors, Σ_{t,s} (a_t·a_s)(d_t·d_s),
    so a factored or sketched build never forms the (dout × din) gradient just for its norm; None
    where forming it is cheaper (L·(din + dout) ≥ din·dout), for rank-one blocks (handled by
    ``Block.sq_norms``) and bias-only blocks. An embedding's a_t·a_s is [id_t = id_s].

    L counts only the positions where some example of the chunk has a nonzero output gradient
    d_t: a term with d_t = 0 is exactly zero, so dropping it changes nothing. That is what makes
    the ghost form pay on padded text (T = 128 positions, a dozen real tokens: masked padding
    gets no gradient), where counting every position would form the gradient instead."""
    import torch

    if blk.kind != "outer" or not getattr(blk, "has_weight", True) or blk.d.shape[1] == 1:
        return None
    n, L, dout = blk.d.shape
    din = blk.a_shape[2]
    if din * dout <= din + dout:
        return None
    live = np.flatnonzero(np.any(np.asarray(blk.d) != 0, axis=(0, 2)))
    if len(live) * (din + dout) >= din * dout:
        return None
    if len(live) == 0:
        return np.zeros(n, dtype=np.float64)
    d = torch.from_numpy(np.ascontiguousarray(np.asarray(blk.d)[:, live], dtype=np.float64))
    dd = torch.bmm(d, d.transpose(1, 2))
    idx = getattr(blk, "idx", None)
    if idx is not None:
        t = torch.from_numpy(np.ascontiguousarray(np.asarray(idx)[:, live]))
        aa = (t[:, :, None] == t[:, None, :]).to(torch.float64)
    else:
        a = torch.from_numpy(np.ascontiguousarray(np.asarray(blk.a_in)[:, live], dtype=np.float64))
        aa = torch.bmm(a, a.transpose(1, 2))
    if getattr(blk, "has_bias", False):
        aa = aa + 1.0
    return (aa * dd).sum(dim=(1, 2)).numpy()


@dataclass
class BlockInfo:
    """Shape of one engine block: where its parameters sit in the flat gradient and its factor sizes."""

    name: str
    kind: str
    size: int
    parts: list[tuple[str, int, int]]  # (parameter name, global offset, numel)
    din: int = 0
    dout: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "size": self.size, "din": self.din, "dout": self.dout,
                "parts": [list(p) for p in self.parts]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BlockInfo":
        return cls(d["name"], d["kind"], int(d["size"]), [tuple(p) for p in d["parts"]], int(d["din"]), int(d["dout"]))


def layout_of(blocks: Sequence[Any], offsets: dict[str, int]) -> list[BlockInfo]:
    """The layout of a chunk's blocks (``engine.iter_blocks`` output) given ``engine.offsets()``."""
    out = []
    for b in blocks:
        parts = [(name, int(offsets[name]), int(n)) for name, n in b.parts]
        if b.kind == "outer":
            out.append(BlockInfo(b.name, "outer", b.size, parts, int(b.a_shape[2]), int(b.d.shape[2])))
        else:
            out.append(BlockInfo(b.name, "full", b.size, parts))
    return out


def layout_to_json(layout: Sequence[BlockInfo]) -> list[dict[str, Any]]:
    return [b.to_dict() for b in layout]


def layout_from_json(data: Sequence[dict[str, Any]]) -> list[BlockInfo]:
    return [BlockInfo.from_dict(d) for d in data]


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


def random_matrix(rows: int, cols: int, dist: str, scale_dim: int, *key: int) -> np.ndarray:
    """A (rows × cols) float32 matrix, ±1/√scale_dim or N(0, 1/scale_dim), from the stream ``key``."""
    rng = _rng(*key)
    s = np.float32(1.0 / math.sqrt(scale_dim))
    if dist == "rademacher":
        nbytes = (rows * cols + 7) // 8
        bits = np.unpackbits(np.frombuffer(rng.bytes(nbytes), dtype=np.uint8))[: rows * cols]
        M = bits.astype(np.float32)
        M *= 2 * s
        M -= s
        return M.reshape(rows, cols)
    M = rng.standard_normal((rows, cols), dtype=np.float32)
    M *= s
    return M


@dataclass
class Projector:
    """Applies a :class:`ProjectionSpec` to the blocks of a chunk; stateless apart from a matrix cache.

    ``cache_bytes``: when the whole dense matrix fits, its row blocks are kept after first use
    (small models). Otherwise what a chunk needs is kept while it fits the budget: the Kronecker
    factors and CountSketch hashes of each block, and the slices of dense rows the small blocks
    (biases, norms, tiny layers) are projected with; each is generated once per projector (once
    per build) instead of once per chunk. Beyond the budget they are regenerated per chunk, so
    memory stays bounded. The values are the same either way (slices of the same seeded rows).
    """

    spec: ProjectionSpec
    layout: list[BlockInfo]
    cache_bytes: int = 256 << 20
    _cache: dict[tuple, np.ndarray] = field(default_factory=dict, repr=False)
    _cached_bytes: int = field(default=0, repr=False)

    @property
    def input_dim(self) -> int:
        return int(sum(b.size for b in self.layout))

    @property
    def dim(self) -> int:
        """Dimension of the projected vectors."""
        return self.input_dim if self.spec.kind == "none" else int(self.spec.dim)

    def _cached(self, key: tuple, make, whole: bool = False) -> np.ndarray:
        """``make()`` once: kept when the whole matrix fits the budget, or (``whole`` False: a
        factor, hash or row slice, not a full dense row block) while the kept bytes stay within it."""
        M = self._cache.get(key)
        if M is None:
            M = make()
            if self._fits() or not whole and self._cached_bytes + M.nbytes <= self.cache_bytes:
                self._cache[key] = M
                self._cached_bytes += M.nbytes
        return M

    def _fits(self) -> bool:
        if self.spec.kind == "sketch":
            return True  # hashes: O(din + dout + size) per block
        factor = sum(b.din * 1 + b.dout * 1 for b in self.layout) * self.spec.dim
        return (self.input_dim * self.spec.dim + factor) * 4 <= self.cache_bytes

    def dense_rows(self, j: int) -> np.ndarray:
        """Row block j of the dense matrix P: rows [j·R, (j+1)·R), shape (R, k)."""
        R, k = self.spec.block_rows, self.spec.dim
        return self._cached(("d", j), lambda: random_matrix(R, k, self.spec.dist, k, self.spec.seed, 0, j), whole=True)

    def row_slice(self, j: int, r0: int, take: int) -> np.ndarray:
        """Rows [r0, r0 + take) of row block j (a copy, kept by the cache rules above)."""
        if ("d", j) in self._cache or self._fits() or self.spec.kind == "dense":  # dense: all rows or none kept
            return self.dense_rows(j)[r0:r0 + take]
        return self._cached(("s", j, r0, take), lambda: self.dense_rows(j)[r0:r0 + take].copy())

    def factors(self, bi: int) -> tuple[np.ndarray, np.ndarray]:
        """(P_out (dout × k_out), P_in (din × k_in)) of layout block ``bi`` for the factored kind."""
        b = self.layout[bi]
        k_out, k_in = factor_dims(self.spec.dim)
        Po = self._cached(("o", bi), lambda: random_matrix(b.dout, k_out, self.spec.dist, k_out, self.spec.seed, 1, bi, 1))
        Pi = self._cached(("i", bi), lambda: random_matrix(b.din, k_in, self.spec.dist, k_in, self.spec.seed, 1, bi, 0))
        return Po, Pi

    def hashes(self, bi: int, which: int, m: int) -> tuple[np.ndarray, np.ndarray]:
        """CountSketch (bucket, sign) of an m-dim factor of block ``bi`` (which: 0 input / full, 1 output)."""
        def make():
            rng = _rng(self.spec.seed, 2, bi, which)
            h = rng.integers(0, self.spec.dim, size=m, dtype=np.int64)
            sgn = (rng.integers(0, 2, size=m, dtype=np.int8) * 2 - 1).astype(np.float32)
            return np.stack([h.astype(np.float64), sgn.astype(np.float64)])
        hs = self._cached(("h", bi, which), make)
        return hs[0].astype(np.int64), hs[1].astype(np.float32)

    def _countsketch(self, x, bi: int, which: int):
        """CountSketch of the last axis of x (torch, (..., m)) into k buckets."""
        import torch

        h, sgn = self.hashes(bi, which, x.shape[-1])
        flat = x.reshape(-1, x.shape[-1]) * torch.from_numpy(sgn)
        out = torch.zeros(flat.shape[0], self.spec.dim, dtype=flat.dtype)
        out.index_add_(1, torch.from_numpy(h), flat)
        return out.reshape(*x.shape[:-1], self.spec.dim)

    def uses_factors(self, bi: int) -> bool:
        """Whether block ``bi`` goes through the Kronecker factors (a function of shapes and k only)."""
        b = self.layout[bi]
        if not (b.kind == "outer" and b.size > self.spec.dim):
            return False
        if self.spec.kind == "sketch":
            # per position: TensorSketch ~ din + dout + 3·k·log2 k FFT flops (counted twice: an FFT flop is
            # slower than a GEMM flop), forming d aᵀ ~ 2·din·dout GEMM flops. Depends on shapes and k only.
            k = self.spec.dim
            return b.din + b.dout + 6 * k * math.log2(k) < 2 * b.din * b.dout
        return self.spec.kind == "factored"

    def check_layout(self, blocks: Sequence[Any]) -> None:
        """Raise ValueError when a chunk's blocks do not have the recorded layout."""
        if len(blocks) != len(self.layout):
            raise ValueError(f"the engine produced {len(blocks)} gradient blocks, the index was built with "
                             f"{len(self.layout)}: parameter selection or model architecture differ.")
        for blk, info in zip(blocks, self.layout):
            if blk.name != info.name or blk.size != info.size or blk.kind != info.kind:
                raise ValueError(f"gradient block {blk.name!r} ({blk.kind}, {blk.size} parameters) does not match "
                                 f"the index's {info.name!r} ({info.kind}, {info.size}).")

    def project(self, blocks: Sequence[Any]) -> np.ndarray:
        """Projected (n, dim) float32 rows for the blocks of one chunk (flat gradient when kind='none')."""
        return self.project_with_norms(blocks, norms=False)[0]

    def project_with_norms(self, blocks: Sequence[Any], norms: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """(projected rows, exact squared gradient norms (n,) float64 or None).

        The norms come from the blocks (rank-one factors directly, other blocks from the gradient
        that is formed anyway), so a block is never formed twice.
        """
        self.check_layout(blocks)
        cache: dict[int, np.ndarray] = {}

        def mat(bi: int, blk: Any) -> np.ndarray:
            if bi not in cache:
                cache[bi] = np.asarray(blk.materialize(), dtype=np.float32)
            return cache[bi]

        V = self._project(blocks, mat)
        if not norms:
            return V, None
        sq = np.zeros(len(V), dtype=np.float64)
        for bi, blk in enumerate(blocks):
            ghost = None if bi in cache else ghost_sq_norms(blk)
            if blk.kind == "outer" and blk.d.shape[1] == 1 and getattr(blk, "has_weight", True) and bi not in cache:
                sq += blk.sq_norms()
            elif ghost is not None:
                sq += ghost
            else:
                m = mat(bi, blk)
                sq += np.einsum("ij,ij->i", m, m, dtype=np.float64)
        return V, sq

    def _project(self, blocks: Sequence[Any], mat) -> np.ndarray:
        import torch

        n = blocks[0].n
        if self.spec.kind == "none":
            out = np.empty((n, self.input_dim), dtype=np.float32)
            for bi, (blk, info) in enumerate(zip(blocks, self.layout)):
                m = mat(bi, blk)
                c = 0
                for _, off, size in info.parts:
                    out[:, off:off + size] = m[:, c:c + size]
                    c += size
            return out
        k = self.spec.dim
        out = np.zeros((n, k), dtype=np.float32)
        ot = torch.from_numpy(out)
        for bi, (blk, info) in enumerate(zip(blocks, self.layout)):
            if self.spec.kind == "sketch":
                self._sketch_block(ot, blk, info, bi, mat)
                continue
            if self.uses_factors(bi):
                Po, Pi = self.factors(bi)
                d = torch.from_numpy(np.ascontiguousarray(blk.d, dtype=np.float32))
                if getattr(blk, "idx", None) is not None:  # embedding: one-hot rows @ P_in = rows of P_in
                    pa = torch.from_numpy(Pi)[torch.from_numpy(blk.idx)]
                else:
                    a = torch.from_numpy(np.ascontiguousarray(blk.a, dtype=np.float32))
                    pa = torch.matmul(a, torch.from_numpy(Pi))  # (n, L, k_in)
                pd = torch.matmul(d, torch.from_numpy(Po))  # (n, L, k_out)
                if pa.shape[1] == 1:
                    ot += (pd[:, 0, :, None] * pa[:, 0, None, :]).reshape(n, k)
                else:
                    ot += torch.bmm(pd.transpose(1, 2), pa).reshape(n, k)
                continue
            m = mat(bi, blk)
            c = 0
            for _, off, size in info.parts:
                self._dense_part(ot, torch.from_numpy(np.ascontiguousarray(m[:, c:c + size])), off)
                c += size
        return out

    def _sketch_block(self, ot, blk: Any, info: BlockInfo, bi: int, mat) -> None:
        """ot += TensorSketch of an outer block (or CountSketch of its materialized rows)."""
        import torch

        k = self.spec.dim
        if self.uses_factors(bi):
            d = torch.from_numpy(np.ascontiguousarray(blk.d, dtype=np.float32))
            if getattr(blk, "idx", None) is not None:  # embedding: CountSketch of one-hot rows, by token id
                h, sgn = self.hashes(bi, 0, info.din)
                idx = torch.from_numpy(blk.idx)
                ca = torch.zeros(*idx.shape, k, dtype=torch.float32)
                ca.scatter_(2, torch.from_numpy(h)[idx][..., None], torch.from_numpy(sgn)[idx][..., None])
            else:
                ca = self._countsketch(torch.from_numpy(np.ascontiguousarray(blk.a, dtype=np.float32)), bi, 0)
            fa = torch.fft.rfft(ca, n=k)  # (n, L, k//2+1)
            fd = torch.fft.rfft(self._countsketch(d, bi, 1), n=k)
            ot += torch.fft.irfft((fa * fd).sum(dim=1), n=k)
            return
        m = torch.from_numpy(np.ascontiguousarray(mat(bi, blk)))
        ot += self._countsketch(m, bi, 0)

    def _dense_part(self, ot, G, off: int) -> None:
        """ot += G @ P[off:off+size] for one parameter's columns G (torch views)."""
        import torch

        R = self.spec.block_rows
        size = G.shape[1]
        pos = 0
        while pos < size:
            g = off + pos
            j, r0 = divmod(g, R)
            take = min(R - r0, size - pos)
            P = torch.from_numpy(self.row_slice(j, r0, take))
            ot.addmm_(G[:, pos:pos + take], P)
            pos += take

    def project_flat(self, G: np.ndarray) -> np.ndarray:
        """Dense projection of flat gradient rows G (n, D): the reference the block path is tested against."""
        import torch

        if self.spec.kind != "dense":
            raise ValueError("project_flat is defined for kind='dense' only.")
        out = np.zeros((len(G), self.spec.dim), dtype=np.float32)
        self._dense_part(torch.from_numpy(out), torch.from_numpy(np.ascontiguousarray(G, dtype=np.float32)), 0)
        return out


__all__ = ["ProjectionSpec", "Projector", "BlockInfo", "layout_of", "layout_to_json", "layout_from_json",
           "factor_dims", "random_matrix", "PROJECTION_KINDS", "DISTRIBUTIONS"]
