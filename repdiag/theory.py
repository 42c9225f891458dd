"""The repetition quantities of ``spec/repetition-theory.md`` §1–§7 on a transition matrix.

Pure numpy / scipy (never torch or transformers). The main entry is :func:`compute_quantities`,
which returns exactly the layout of spec §12::

    {"n": n, "eos_index": n, "route": "dense" | "sparse", "quantities": {...}}

On the sparse route three members sit beside ``quantities`` (no spec key is ever renamed or moved):
``"partial"`` (the dotted keys whose value is not the exact spec value: an estimate, a certified
relaxation or a truncated series), ``"notes"`` (one line per such key saying what it is) and
``"estimates"`` (``{"su_R" | "fu_arp": {"se", "tail_bound"}}`` for the Hutchinson estimates).
When ``eos_index`` is not last, ``"state_order"`` lists the caller's index of each token state.

Conventions (spec §1, §12 "Conventions"):

* ``A`` is ``(n+1)×(n+1)`` row-stochastic; ``<eos>`` is moved to the **last** index if
  ``eos_index`` is not already last, and every per-token list is then in the order of the
  remaining states (caller's order with ``<eos>`` removed); ``greedy.next``, ``cycles`` and
  ``cyclic_sccs`` use those positions too, with ``n`` for ``<eos>``.
* ``B = A[:n,:n]``, ``b = A[:n,n]``, ``Q = B∘B``, ``S = 1[B>0]``.
* ``residual`` (optional, length ``n+1`` in the caller's order) is the unstored mass of each row,
  spread uniformly over that row's unstored (zero) non-``<eos>`` columns (spec §2.3, A3).
* A divergent quantity is ``float('inf')``, never NaN, never the closed form past its radius:
  ``R`` / ``r_i`` diverge when ``ρ(Q) ≥ 1 − 1e-12`` (per SCC for ``r_i``); ``R_Fu``,
  ``R_Fu^corr`` and (r-2) when ``ζn ≤ ρ(B)² + 1e-12``; with ``ζn = 0`` these three are 0 (A2).

Routes (spec §3.5, §4.6, §13). Both work per cyclic SCC (closed walks never leave one):

* ``"dense"`` (auto for ``n ≤ 4096``): LAPACK eigenvalues of every SCC block, dense block solves
  for ``r_i`` and the Fu closed form, matrix powers (CSR products when a block is sparse) for the
  traces, the rigorous lower bounds and the corrected ARP with certified tails, SVDs of ``B²`` and
  ``ζnI − B²`` for Theorem 1 / Cor 1.1, and the whole-matrix Collatz–Wielandt iteration (4000 steps).
* ``"sparse"``: ``B`` stays CSR plus the rank-one residual part; SCCs by
  ``scipy.sparse.csgraph``; SCCs of ≤ 4096 states exactly as above (their spectral radii by the
  Collatz–Wielandt power iteration to a 1e-14 bracket, LAPACK as the fallback); larger SCCs by
  power iteration with the certified bracket (ARPACK fallback), exact ``k ≤ 2`` traces, Hutchinson
  estimates of the ``k ≥ 3`` terms and certified tails; termination by GMRES; Theorem 1 / Cor 1.1
  / Cor 1.2 with the certified relaxation of §4.6 (``‖B²‖_*`` upper bound, ``σ_min ≥ max(D, 0)``,
  ``rank ≤ #non-zero columns``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import scipy.sparse.csgraph as csgraph
import scipy.sparse.linalg as spla

from .errors import MatrixFormatError, UsageError

__all__ = [
    "DIVERGENCE_TOL",
    "DENSE_MAX_STATES",
    "compute_quantities",
    "policy_case_quantities",
    "validate_transition_matrix",
    "to_spec_layout",
    "sparsity",
    "row_collision",
    "row_collision_full",
    "flows",
    "cyclic_sccs",
    "spectral_radius",
    "frobenius_interval",
    "collatz_wielandt_bracket",
    "su_repetition_sum",
    "su_lower_bounds",
    "su_estimate_r2",
    "fu_arp",
    "fu_arp_corrected",
    "fu_theorem1_bounds",
    "theorem2_rhs",
    "termination",
    "occupation",
    "greedy_next",
    "greedy_graph",
    "traces_k_limit",
    "default_mc_trajectories",
]

DIVERGENCE_TOL = 1e-12  # spec §12 Conventions
DENSE_MAX_STATES = 4096  # spec §3.5: dense route for n ≲ 4096; also the exact per-SCC block size
ROW_SUM_TOL = 1e-6
_INF = float("inf")
_CW_ITERS = 4000  # spec §3.2
_HUTCH_PROBES = 4  # sparse route, SCCs > 4096 states: Rademacher probes (spec suggests ≈ 32: cost, see notes)
_HUTCH_KMAX_Q = 6  # sparse route, SCCs > 4096 states: Hutchinson levels of Q^k (tail certified, see notes)
_HUTCH_KMAX_B = 8  # ... and of B^k (tr B^2k for k <= 4)
_SERIES_RTOL = 1e-15  # series are cut when the certified tail is below this × the partial sum
_SERIES_CAP = 20000


# --------------------------------------------------------------------------------------------
# validation and layout
# --------------------------------------------------------------------------------------------


def _shape_of(A: Any) -> tuple[int, ...]:
    shape = getattr(A, "shape", None)
    if shape is None:
        raise MatrixFormatError("transition matrix is not an array: give a 2-D numpy array or scipy.sparse matrix")
    return tuple(int(s) for s in shape)


def validate_transition_matrix(A: Any, eos_index: int | None = None, residual: Any = None) -> int:
    """Check that ``A`` is a valid transition matrix (spec §1) and return the ``<eos>`` index.

    Raises :class:`repdiag.errors.MatrixFormatError` with one line naming the first problem:
    non-square / non-2-D shape, ``eos_index`` out of range, NaN or infinite entry, negative entry,
    a row whose sum (plus its ``residual``) is not 1 within 1e-6, or a non-absorbing ``<eos>`` row.
    """
    shape = _shape_of(A)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise MatrixFormatError(f"transition matrix must be square (N, N); got shape {shape}")
    N = shape[0]
    if N < 2:
        raise MatrixFormatError(f"transition matrix needs at least 2 states (tokens plus <eos>); got {N}")
    if eos_index is None:
        eos = N - 1
    else:
        try:
            eos = int(eos_index)
        except (TypeError, ValueError):
            raise MatrixFormatError(f"eos index {eos_index!r} is not an integer") from None
        if not 0 <= eos < N:
            raise MatrixFormatError(f"eos index {eos} is out of range for a {N}x{N} matrix (allowed 0..{N - 1})")
    res = None
    if residual is not None:
        res = np.asarray(residual, dtype=np.float64).ravel()
        if res.shape != (N,):
            raise MatrixFormatError(f"residual must have one entry per row ({N}); got shape {res.shape}")
        bad = np.flatnonzero(~np.isfinite(res) | (res < 0))
        if bad.size:
            raise MatrixFormatError(f"residual of row {bad[0]} is {float(res[bad[0]])!r}: it must be finite and >= 0")
    if sp.issparse(A):
        M = sp.csr_matrix(A)
        data = np.asarray(M.data, dtype=np.float64)

        def row_of(k):  # row of stored entry k (only on the error path)
            return int(np.searchsorted(M.indptr, k, side="right") - 1)

        badf = ~np.isfinite(data)
        if badf.any():
            k = int(np.flatnonzero(badf)[0])
            raise MatrixFormatError(f"row {row_of(k)} column {M.indices[k]} is {float(data[k])!r}: entries must be finite")
        badn = data < 0
        if badn.any():
            k = int(np.flatnonzero(badn)[0])
            raise MatrixFormatError(f"row {row_of(k)} column {M.indices[k]} is negative ({float(data[k])!r}): probabilities must be >= 0")
        sums = np.asarray(M.sum(axis=1), dtype=np.float64).ravel()
        eos_row = M.getrow(eos).toarray().ravel()
    else:
        D = np.asarray(A)
        if D.dtype.kind not in "fiub":
            raise MatrixFormatError(f"transition matrix has dtype {D.dtype}: it must be numeric")
        D = D.astype(np.float64, copy=False)
        badf = ~np.isfinite(D)
        if badf.any():
            i, j = np.argwhere(badf)[0]
            raise MatrixFormatError(f"row {i} column {j} is {float(D[i, j])!r}: entries must be finite (no NaN/inf)")
        badn = D < 0
        if badn.any():
            i, j = np.argwhere(badn)[0]
            raise MatrixFormatError(f"row {i} column {j} is negative ({float(D[i, j])!r}): probabilities must be >= 0")
        sums = D.sum(axis=1)
        eos_row = D[eos]
    if res is not None:
        sums = sums + res
    bad = np.flatnonzero(np.abs(sums - 1.0) > ROW_SUM_TOL)
    if bad.size:
        i = int(bad[0])
        what = "row sum plus residual" if res is not None else "row sum"
        raise MatrixFormatError(f"row {i} does not sum to 1 ({what} = {float(sums[i])!r}, tolerance 1e-6): renormalise the rows")
    off = eos_row.copy()
    off[eos] = 0.0
    if abs(eos_row[eos] - 1.0) > ROW_SUM_TOL or off.max(initial=0.0) > ROW_SUM_TOL or (res is not None and res[eos] > ROW_SUM_TOL):
        raise MatrixFormatError(
            f"<eos> row {eos} is not absorbing (A[{eos},{eos}] = {float(eos_row[eos])!r}): set A[eos, eos] = 1 and the rest of that row to 0"
        )
    return eos


def to_spec_layout(A: Any, eos_index: int | None = None, residual: Any = None):
    """Return ``(A', residual', order)`` with ``<eos>`` moved last: ``A' = A[order][:, order]``.

    ``order`` lists the original state indices in the new order (the non-``<eos>`` states keep
    their relative order). The ``<eos>`` row is reset to exactly absorbing.
    """
    N = _shape_of(A)[0]
    eos = N - 1 if eos_index is None else int(eos_index)
    order = np.concatenate([np.arange(eos), np.arange(eos + 1, N), [eos]]).astype(np.int64)
    ident = eos == N - 1
    res = None if residual is None else np.asarray(residual, dtype=np.float64).ravel()
    if sp.issparse(A):
        M = sp.csr_matrix(A, dtype=np.float64)
        if not ident:
            M = M[order][:, order].tocsr()
            res = None if res is None else res[order]
    else:
        M = np.asarray(A, dtype=np.float64)
        if not ident:
            M = M[np.ix_(order, order)]
            res = None if res is None else res[order]
    return M, res, order


# --------------------------------------------------------------------------------------------
# internal chain representation
# --------------------------------------------------------------------------------------------


@dataclass
class _Op:
    """A non-eos ``n×n`` matrix as ``C + v 1ᵀ`` (CSR part ``C`` plus a column-uniform part ``v``).

    The residual-uniform model of spec §2.3 is exactly of this form: unstored entries of row ``i``
    all equal ``u_i``; stored ones are ``C_ij + u_i``.
    """

    C: sp.csr_matrix
    v: np.ndarray
    CT: sp.csr_matrix | None = None  # C's transpose as CSR (sparse route: one row-wise kernel for Cᵀy)

    @property
    def has_v(self) -> bool:
        hv = getattr(self, "_hv", None)
        if hv is None:
            hv = self._hv = bool(np.any(self.v))
        return hv

    def matvec(self, x: np.ndarray) -> np.ndarray:
        y = self.C @ x
        if self.has_v:
            y = y + (np.outer(self.v, x.sum(axis=0)) if x.ndim == 2 else self.v * x.sum())
        return y

    def rmatvec(self, y: np.ndarray) -> np.ndarray:
        x = (self.CT if self.CT is not None else self.C.T) @ y
        if self.has_v:
            x = x + (self.v @ y)
        return x

    def block(self, idx: np.ndarray) -> "_Op":
        C = self.C[idx][:, idx].tocsr()
        return _Op(C, self.v[idx])

    def dense(self) -> np.ndarray:
        D = self.C.toarray()
        if self.has_v:
            D += self.v[:, None]
        return D

    def explicit(self) -> sp.csr_matrix:
        if not self.has_v:
            return self.C
        return (self.C + sp.csr_matrix(np.outer(self.v, np.ones(self.C.shape[1])))).tocsr()

    def diag(self) -> np.ndarray:
        return self.C.diagonal() + self.v

    def diag_sq(self) -> np.ndarray:
        """``(X²)_ii = Σ_j X_ij X_ji`` exactly, O(nnz)."""
        d = np.asarray(self.C.multiply(self.C.T.tocsr()).sum(axis=1)).ravel()
        if self.has_v:
            col = np.asarray(self.C.sum(axis=0)).ravel()
            d = d + self.v * col + self.C @ self.v + self.v * self.v.sum()
        return d


@dataclass
class _Chain:
    n: int
    dense: bool
    b: np.ndarray
    # dense route
    Bd: np.ndarray | None = None
    # sparse route
    Bst: sp.csr_matrix | None = None  # stored positive non-eos entries
    u: np.ndarray | None = None  # residual per unstored non-eos entry of each row
    ops: dict = field(default_factory=dict)
    #: smallest reciprocal condition number met by a dense termination solve below 1e-12, if any
    worst_rcond: float | None = None

    # ---- construction
    @classmethod
    def build(cls, A, residual, dense: bool) -> "_Chain":
        N = A.shape[0]
        n = N - 1
        if sp.issparse(A):
            A = A.tocsr()
            A.sum_duplicates()  # canonical: sorted indices, no duplicates
            if not dense:  # one pass over the CSR arrays instead of two submatrix copies
                ip = A.indptr
                end = int(ip[n])
                ind = A.indices[:end]
                dat = np.asarray(A.data[:end], dtype=np.float64)
                last = ip[1 : n + 1] - 1
                has = (last >= ip[:n]) & (A.indices[np.maximum(last, 0)] == n)  # <eos> is each row's last column
                b = np.zeros(n)
                b[has] = dat[last[has]]
                keep = (ind < n) & (dat > 0)
                ck = np.zeros(end + 1, dtype=np.int32 if end < 2**31 - 1 else np.int64)
                np.cumsum(keep, out=ck[1:])
                idt = np.int32 if max(n, int(ck[-1])) < 2**31 - 1 else np.int64
                Bst = sp.csr_matrix((dat[keep], ind[keep].astype(idt, copy=False), ck[ip[: n + 1]].astype(idt)),
                                    shape=(n, n), copy=False)
                Bst.has_sorted_indices = True
            else:
                b = A[:n, n].toarray().ravel()
                Bst = A[:n, :n].tocsr()
        else:
            b = np.array(A[:n, n], dtype=np.float64)
            Bst = None
        res = np.zeros(n) if residual is None else np.asarray(residual, dtype=np.float64)[:n].copy()
        if dense:
            Bd = np.array(A[:n, :n].toarray() if sp.issparse(A) else A[:n, :n], dtype=np.float64)
            if res.any():
                zero = Bd <= 0
                cnt = zero.sum(axis=1)
                rows = np.flatnonzero(res > 0)
                for i in rows:
                    if cnt[i] == 0:
                        if res[i] > ROW_SUM_TOL:
                            raise MatrixFormatError(f"row {i} has residual {float(res[i])!r} but no unstored non-eos column to hold it")
                        continue
                    Bd[i, zero[i]] = res[i] / cnt[i]
            return cls(n=n, dense=True, b=b, Bd=Bd)
        if Bst is None:
            Bst = sp.csr_matrix(np.asarray(A[:n, :n], dtype=np.float64))
        Bst = Bst.astype(np.float64, copy=False)
        Bst.data[Bst.data < 0] = 0.0
        Bst.eliminate_zeros()
        Bst.sort_indices()
        Bst.indices = Bst.indices.astype(np.int32, copy=False) if n < 2**31 else Bst.indices
        K = np.diff(Bst.indptr)
        free = n - K
        u = np.zeros(n)
        pos = res > 0
        bad = pos & (free == 0) & (res > ROW_SUM_TOL)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise MatrixFormatError(f"row {i} has residual {float(res[i])!r} but no unstored non-eos column to hold it")
        ok = pos & (free > 0)
        u[ok] = res[ok] / free[ok]
        return cls(n=n, dense=False, b=b, Bst=Bst, u=u)

    # ---- operators (sparse route)
    def rows(self) -> np.ndarray:
        if "rows" not in self.ops:
            self.ops["rows"] = np.repeat(np.arange(self.n, dtype=np.int32), np.diff(self.Bst.indptr))
        return self.ops["rows"]

    def transposed(self) -> tuple[np.ndarray, sp.csr_matrix]:
        """(perm, T): ``T`` is the CSR structure of the transpose; ``data[perm]`` is its data."""
        if "T" not in self.ops:
            idt = np.int32 if self.Bst.nnz < 2**31 - 1 else np.int64
            P = sp.csr_matrix((np.arange(self.Bst.nnz, dtype=idt), self.Bst.indices, self.Bst.indptr),
                              shape=self.Bst.shape).T.tocsr()
            P.sort_indices()
            perm = P.data
            P.data = np.empty(0)
            self.ops["T"] = (perm, P)
        return self.ops["T"]

    def exact_diags(self, which: str, K: int) -> list[np.ndarray]:
        """``diag(X^k)`` for ``k = 1..K`` of the full matrix (``k ≥ 3`` only while ``K_t`` allows)."""
        key = ("diag", which)
        have = self.ops.get(key, [])
        if len(have) >= K:
            return have[:K]
        X = self.op(which, cache=False)
        out = [X.diag()]
        perm, T = self.transposed()
        XT = sp.csr_matrix((X.C.data[perm], T.indices, T.indptr), shape=X.C.shape, copy=False)
        d2 = np.asarray(X.C.multiply(XT).sum(axis=1)).ravel()
        if X.has_v:
            col = np.asarray(X.C.sum(axis=0)).ravel()
            d2 = d2 + X.v * col + X.C @ X.v + X.v * X.v.sum()
        out.append(d2)
        if K >= 3:
            Xe = X.explicit()
            P = Xe @ Xe
            for _ in range(3, K + 1):
                P = Xe @ P
                out.append(P.diagonal())
        self.ops[key] = out
        return out[:K]

    def op(self, which: str, cache: bool = True) -> _Op:
        if which in self.ops:
            return self.ops[which]
        Bst, u = self.Bst, self.u
        rows = self.rows() if np.any(u) else None
        if which == "B":
            data = Bst.data - u[rows] if np.any(u) else Bst.data  # shares Bst's data without residual
            v = u
        elif which == "Q":
            data = Bst.data**2 - (u**2)[rows] if np.any(u) else Bst.data**2
            v = u**2
        elif which == "S":
            h = (u > 0).astype(np.float64)
            data = 1.0 - h[rows] if rows is not None else np.ones(Bst.data.size)
            v = h
        else:  # pragma: no cover
            raise KeyError(which)
        C = sp.csr_matrix((data, Bst.indices, Bst.indptr), shape=Bst.shape, copy=False)
        if which == "S" and not cache:
            return _Op(C, v)
        self.ops[which] = _Op(C, v)
        return self.ops[which]

    # ---- generic products on B (both routes)
    def B_matvec(self, x):
        return self.Bd @ x if self.dense else self.op("B").matvec(x)

    def B_rmatvec(self, y):
        if self.dense:
            return self.Bd.T @ y
        return self.BT_op().rmatvec(y)

    def BT_op(self) -> _Op:
        """``op("B")`` with the CSR of ``Cᵀ`` attached (one O(nnz) transpose; ``Cᵀy`` by the row-wise
        CSR kernel is ~3x faster than the CSC kernel). Without residual ``C`` shares ``Bst``'s data,
        so ``Cᵀ`` is also the transposed support structure."""
        Bo = self.op("B")
        if Bo.CT is None:
            Bo.CT = Bo.C.T.tocsr()
            Bo.CT.sort_indices()
        return Bo

    def Q_matvec(self, x):
        if self.dense:
            return self._Qd() @ x
        return self.op("Q").matvec(x)

    def _Qd(self):
        if "Qd" not in self.ops:
            self.ops["Qd"] = self.Bd * self.Bd
        return self.ops["Qd"]

    def support_graph(self) -> sp.csr_matrix:
        """Directed support graph on the n states, plus a virtual node ``n`` for residual rows."""
        if "G" not in self.ops:
            self.ops["G"] = self._support_graph()
        return self.ops["G"]

    def _support_graph(self) -> sp.csr_matrix:
        if self.dense:
            return sp.csr_matrix(self.Bd > 0)
        n = self.n
        h = np.flatnonzero(self.u > 0)
        if h.size == 0:  # Bst (positive float64 data) is the support graph as csgraph wants it: no copy
            return self.Bst
        G = sp.csr_matrix((np.ones_like(self.Bst.data, dtype=np.int8), self.Bst.indices, self.Bst.indptr), shape=(n, n))
        rows = np.concatenate([h, np.full(n, n)])
        cols = np.concatenate([np.full(h.size, n), np.arange(n)])
        extra = sp.csr_matrix((np.ones(rows.size, dtype=np.int8), (rows, cols)), shape=(n + 1, n + 1))
        G = sp.vstack([sp.hstack([G, sp.csr_matrix((n, 1), dtype=np.int8)]), sp.csr_matrix((1, n + 1), dtype=np.int8)])
        return (G.tocsr() + extra).tocsr()

    def out_degree(self) -> np.ndarray:
        if self.dense:
            return (self.Bd > 0).sum(axis=1)
        K = np.diff(self.Bst.indptr)
        return np.where(self.u > 0, self.n, K)

    def col_sums(self):
        return self.Bd.sum(axis=0) if self.dense else self.B_rmatvec(np.ones(self.n))

    def block_dense(self, idx: np.ndarray, which: str) -> np.ndarray:
        if self.dense:
            Bc = self.Bd[np.ix_(idx, idx)]
            return {"B": Bc, "Q": Bc * Bc, "S": (Bc > 0).astype(np.float64)}[which]
        return self.op(which).block(idx).dense()


# --------------------------------------------------------------------------------------------
# SCCs
# --------------------------------------------------------------------------------------------


def _sccs(ch: _Chain) -> list[np.ndarray]:
    """Cyclic SCCs (sorted arrays, lexicographically sorted list)."""
    n = ch.n
    G = ch.support_graph()
    ncomp, labels = csgraph.connected_components(G, directed=True, connection="strong")
    labels = labels[:n]
    counts = np.bincount(labels, minlength=ncomp)
    if ch.dense:
        selfloop = np.diag(ch.Bd) > 0
    else:
        selfloop = (ch.Bst.diagonal() > 0) | (ch.u > 0)
    cyc_lab = counts >= 2
    cyc_lab[labels[selfloop]] = True
    keep = cyc_lab[labels]
    idx = np.flatnonzero(keep)
    if idx.size == 0:
        return []
    lab = labels[idx]
    orderi = np.argsort(lab, kind="stable")
    idx, lab = idx[orderi], lab[orderi]
    splits = np.flatnonzero(np.diff(lab)) + 1
    blocks = [np.sort(g) for g in np.split(idx, splits)]
    blocks.sort(key=lambda g: g.tolist())
    return blocks


# --------------------------------------------------------------------------------------------
# Collatz–Wielandt
# --------------------------------------------------------------------------------------------


def _cw_iterate(matvec, x0: np.ndarray, iters: int, shift: float = 1.0, stop_width: float = 0.0,
                adaptive: bool = False):
    """Power iteration on ``M + shift·I`` from ``x0``; returns ``(lo, hi, x)``, the Collatz–Wielandt
    bracket of ``M`` at the final ``x`` (spec §3.2). Stops early at a numerical fixed point, or
    (``stop_width > 0``) when the bracket is that narrow relative to ``hi``. ``adaptive`` resets the
    shift to ``hi/4`` every 10 steps (breaks periodicity, converges faster when ``ρ`` is small)."""
    x = np.array(x0, dtype=np.float64)
    x /= x.max()
    y = matvec(x)
    prev_delta = None
    for it in range(iters):
        if stop_width > 0 or (adaptive and it % 10 == 9):
            lo, hi = _cw_ratio(y, x)
            if stop_width > 0 and hi - lo <= stop_width * max(hi, 1e-300):
                return lo, hi, x
            if adaptive and it % 10 == 9 and hi > 0:
                shift = 0.25 * hi
        z = y + shift * x
        mz = z.max()
        if not mz > 0:
            break
        z /= mz
        delta = float(np.max(np.abs(z - x)))
        x = z
        y = matvec(x)
        if delta == 0.0:
            break
        if prev_delta is not None and delta < 1e-15 and prev_delta > 0:
            rate = delta / prev_delta
            if rate < 1 and delta * rate / (1 - rate) < 1e-15:
                break
        prev_delta = delta
    lo, hi = _cw_ratio(y, x)
    return lo, hi, x


def _cw_ratio(y, x):
    pos = x > 0
    if not pos.any():
        return 0.0, 0.0
    ratio = y[pos] / x[pos]
    return float(max(ratio.min(), 0.0)), float(ratio.max())


def _cw_bracket_at(matvec, x):
    y = matvec(x)
    pos = x > 0
    if not pos.any():
        return 0.0, 0.0
    ratio = y[pos] / x[pos]
    lo = float(max(ratio.min(), 0.0))
    hi = float(ratio.max())
    return lo, hi


def collatz_wielandt_bracket(M, iters: int = _CW_ITERS) -> list[float]:
    """Certified bracket ``[min_i (Mx)_i/x_i, max_i (Mx)_i/x_i] ∋ ρ(M)`` (spec §3.2, key
    ``collatz_wielandt_rho_Q``): power iteration on ``I + M`` from ``x = 1`` for ``iters`` steps
    (stopped early only at a numerical fixed point)."""
    M = sp.csr_matrix(M) if sp.issparse(M) else np.asarray(M, dtype=np.float64)
    n = M.shape[0]
    lo, hi, _ = _cw_iterate(lambda x: M @ x, np.ones(n), iters)
    return [lo, hi]


# --------------------------------------------------------------------------------------------
# per-block exact computations
# --------------------------------------------------------------------------------------------


@dataclass
class _Block:
    idx: np.ndarray
    size: int
    exact: bool
    rhoB: float = 0.0
    rhoQ: float = 0.0
    eigB: np.ndarray | None = None
    eigS: np.ndarray | None = None
    cw: tuple[float, float] = (0.0, 0.0)
    r: np.ndarray | None = None
    fu_closed: float = 0.0
    dB: list = field(default_factory=list)  # diag(B^k) for k = 1..
    dQ: list = field(default_factory=list)
    dS: list = field(default_factory=list)
    trB_extra: dict = field(default_factory=dict)  # large blocks: k -> estimated tr(B^k)
    trB_se: dict = field(default_factory=dict)
    trQ_extra: dict = field(default_factory=dict)
    trQ_se: dict = field(default_factory=dict)
    R_se: float = 0.0
    Bmat: Any = None
    Smat: Any = None


def _eigvals(M: np.ndarray) -> np.ndarray:
    if M.shape[0] == 1:
        return np.array([M[0, 0]], dtype=complex)
    return scipy.linalg.eigvals(M, check_finite=False)


def _small_block(ch: _Chain, idx: np.ndarray, zeta_n: float, sparse_mult: bool) -> _Block:
    """A cyclic SCC handled exactly: dense block solves for ``r_i`` and the Fu closed form.

    Spectral radii: LAPACK eigenvalues (dense route, or blocks of ≤ 256 states); on the sparse route
    larger blocks use the Collatz–Wielandt power iteration to a 1e-14 bracket (eigenvalues only as
    the fallback), and (r-2) is then summed as a certified series instead of the eigenvalue form."""
    blk = _Block(idx=idx, size=idx.size, exact=True)
    c = idx.size
    Bc = ch.block_dense(idx, "B")
    Qc = Bc * Bc
    Sc = (Bc > 0).astype(np.float64)
    use_eig = (not sparse_mult) or c <= 256
    # the products of the powers loop: CSR when the block is sparse (same numbers, far faster)
    sparse_mult = sparse_mult or (c > 64 and np.count_nonzero(Sc) < 0.1 * c * c)
    if sparse_mult:
        Bm, Sm, Qm = sp.csr_matrix(Bc), sp.csr_matrix(Sc), sp.csr_matrix(Qc)
    else:
        Bm, Sm, Qm = Bc, Sc, Qc
    if use_eig:
        blk.eigB = _eigvals(Bc)
        eigQ = _eigvals(Qc)
        blk.rhoB = float(np.max(np.abs(blk.eigB)))
        blk.rhoQ = float(np.max(np.abs(eigQ)))
        lo, hi, _ = _cw_iterate(lambda x: Qm @ x, np.ones(c), _CW_ITERS, stop_width=1e-14)
        blk.cw = (lo, hi)
    else:
        rhos = []
        for M, Mdense in ((Bm, Bc), (Qm, Qc)):
            lo0, hi0 = _cw_ratio(M @ np.ones(c), np.ones(c))
            lo, hi, _ = _cw_iterate(lambda x: M @ x, np.ones(c), _CW_ITERS, shift=0.25 * max(hi0, 1e-300),
                                    stop_width=1e-14, adaptive=True)
            if hi - lo > 1e-12 * max(hi, 1e-300):  # slow convergence: LAPACK
                rho = float(np.max(np.abs(_eigvals(Mdense))))
            else:
                rho = 0.5 * (lo + hi)
            rhos.append((rho, (lo, hi)))
        (blk.rhoB, _), (blk.rhoQ, blk.cw) = rhos
    if blk.rhoQ >= 1.0 - DIVERGENCE_TOL:
        blk.r = np.full(c, _INF)
    else:
        X = scipy.linalg.solve(np.eye(c) - Qc, Qc, check_finite=False)
        blk.r = np.maximum(np.diag(X).copy(), 0.0)
    if zeta_n > 0:
        B2 = Bc @ Bc
        if zeta_n > blk.rhoB**2 + DIVERGENCE_TOL:
            Y = scipy.linalg.solve(zeta_n * np.eye(c) - B2, B2, check_finite=False)
            blk.fu_closed = float(np.trace(Y))
        else:
            blk.fu_closed = _INF
    blk.Bmat, blk.Smat = Bm, Sm
    blk._Qm = Qm  # type: ignore[attr-defined]
    blk._sparse = sparse_mult  # type: ignore[attr-defined]
    return blk


def _tail_geo(m: float, q: float, k: int) -> float:
    """``m q^{k+1} / (1 − q)``: certified tail of a geometric majorant after ``k`` terms."""
    if q >= 1.0:
        return _INF
    if q <= 0.0:
        return 0.0
    return m * q ** (k + 1) / (1.0 - q)


def _powers_loop(blk: _Block, zeta_n: float, K_t: int, K_lb: int, K_mc: int, corr_conv: bool, fu_conv: bool,
                 m_tot: float = 0.0, rho_max: float = 0.0) -> None:
    """Diagonals of B^k, Q^k, S^k on one exact block until every series that needs them is
    certified to 1e-15 relative (or its fixed length is reached)."""
    c = blk.size
    Bm, Sm, Qm = blk.Bmat, blk.Smat, blk._Qm  # type: ignore[attr-defined]
    PB = np.eye(c)
    PQ = np.eye(c)
    PS = np.eye(c)
    m = float(c)
    rhoQ, rhoB = blk.rhoQ, blk.rhoB
    cumQ = 0.0
    cumCorr = 0.0
    cumFu = 0.0
    needQ = True
    needS = True
    needB = True
    k = 0
    while (needQ or needB) and k < _SERIES_CAP:
        k += 1
        if needB:
            PB = Bm @ PB
            dB = np.diag(PB).copy()
            blk.dB.append(dB)
            if zeta_n > 0:
                cumCorr += float(np.dot(dB, dB)) / zeta_n**k
                if k % 2 == 0:
                    cumFu += float(dB.sum()) / zeta_n ** (k // 2)
        if needQ:
            PQ = Qm @ PQ
            dQ = np.diag(PQ).copy()
            blk.dQ.append(dQ)
            cumQ += float(dQ.sum())
        if needS:
            PS = Sm @ PS
            blk.dS.append(np.diag(PS).copy())
        # stop rules
        q_ok = rhoQ < 1.0 - DIVERGENCE_TOL and _tail_geo(m, rhoQ, k) <= _SERIES_RTOL * max(cumQ, 1e-300)
        needQ = k < K_t or (k < K_lb and not q_ok) or (k < K_mc and not q_ok)
        needS = needQ and k < K_lb or k < K_t
        b_done = k >= K_t and not needQ
        if b_done and corr_conv and zeta_n > 0:
            # Σ_i ((B^k)_ii)² ≤ min(tr B^k, (tr B^k)²) ≤ min(m ρ^k, m² ρ^{2k}) (diagonals in [0, 1])
            tail = min(_tail_geo(m, rhoB / zeta_n, k), _tail_geo(m * m, rhoB**2 / zeta_n, k))
            b_done = tail <= _SERIES_RTOL * max(cumCorr, 1e-300)
        if b_done and k < 2 * K_mc and fu_conv and zeta_n > 0:
            qf = rhoB**2 / zeta_n
            b_done = _tail_geo(m, qf, k // 2) <= _SERIES_RTOL * max(cumFu, 1e-300)
        if b_done and k < 2 * K_mc and not fu_conv:
            b_done = False  # the truncated Monte Carlo reference needs every term up to 2K
        if b_done and blk.eigB is None and corr_conv and zeta_n > 0:  # (r-2) summed as a series
            b_done = _tail_geo(m_tot * m, rho_max * rhoB / zeta_n, k) <= _SERIES_RTOL * max(cumCorr, 1e-300)
        needB = not b_done
    blk._PS = PS  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# large blocks (sparse route only)
# --------------------------------------------------------------------------------------------


def _large_block(ch: _Chain, idx: np.ndarray, zeta_n: float, K_t: int, K_mc: int, seed: int, probes: int) -> _Block:
    """A cyclic SCC of more than 4096 states (sparse route only).

    Works on the full-size operators with vectors supported on the block: closed walks and walks
    between two states of one SCC never leave it, so ``(X^k)_ii`` and ``zᵀX^k z`` (``z`` supported
    on ``C``) equal their block values; no block copy is made.
    """
    blk = _Block(idx=idx, size=idx.size, exact=False)
    n, c = ch.n, idx.size
    mask = np.zeros(n, dtype=bool)
    mask[idx] = True
    Bo, Qo = ch.op("B"), ch.op("Q")

    outside = np.flatnonzero(~mask)

    def restricted(op):
        def mv(x):
            # probe blocks are (probes, n), one contiguous row per probe: scipy's multi-vector CSR
            # kernel is 2-3x slower than one single-vector kernel call per row
            if x.ndim == 2:
                y = np.empty_like(x)
                for j in range(x.shape[0]):
                    y[j] = op.matvec(x[j])
                y[:, outside] = 0.0
            else:
                y = op.matvec(x)
                y[outside] = 0.0
            return y

        return mv

    mvB, mvQ = restricted(Bo), restricted(Qo)
    blk.rhoB, _, _ = _rho_masked(mvB, mask)
    blk.rhoQ, blk.cw, _ = _rho_masked(mvQ, mask)
    if K_t <= 2 and not np.any(ch.u):
        # one product B∘Bᵀ gives all three: (B²)_ii, (Q²)_ii = Σ (B_ij B_ji)², (S²)_ii = #mutual pairs
        C = ch.Bst
        M = C.multiply(ch.BT_op().CT).tocsr()
        M.eliminate_zeros()
        d1 = C.diagonal()
        dB2 = np.asarray(M.sum(axis=1)).ravel()
        M.data **= 2
        dQ2 = np.asarray(M.sum(axis=1)).ravel()
        dS2 = np.diff(M.indptr).astype(np.float64)
        del M
        blk.dB = [d1[idx], dB2[idx]][:max(K_t, 2)]
        blk.dQ = [(d1**2)[idx], dQ2[idx]]
        blk.dS = [(d1 > 0).astype(np.float64)[idx], dS2[idx]]
    else:
        blk.dB = [d[idx] for d in ch.exact_diags("B", max(K_t, 2))]
        blk.dQ = [d[idx] for d in ch.exact_diags("Q", max(K_t, 2))]
        blk.dS = [d[idx] for d in ch.exact_diags("S", max(K_t, 2))]
    kex = len(blk.dB)
    rng = np.random.default_rng(seed)
    Z = np.zeros((probes, n))  # probe j is the row Z[j] (same draws as the former (n, probes) layout)
    Z[:, idx] = (rng.integers(0, 2, size=(c, probes)).astype(np.float64) * 2 - 1).T
    m = float(c)
    # Q powers: r_i and tr Q^k for k > kex by Hutchinson until the certified tail m·ρ̂^(k+1)/(1−ρ̂)
    # is below 1e-12 of the sum or a tenth of the estimate's standard error
    rq = blk.cw[1]
    cumQ = float(sum(d.sum() for d in blk.dQ))
    YQ = Z
    Rprobe = np.zeros(probes)
    dQ_est = []
    for k in range(1, max(kex, _HUTCH_KMAX_Q) + 1):
        YQ = mvQ(YQ)
        if k <= kex:
            continue
        if rq < 1 - DIVERGENCE_TOL and dQ_est:
            se = float(Rprobe.std(ddof=1) / math.sqrt(probes)) if probes > 1 else 0.0
            if _tail_geo(m, rq, k - 1) <= max(1e-12 * max(cumQ, 1e-300), se):
                break
        prod = Z[:, idx] * YQ[:, idx]
        per = prod.sum(axis=1)
        blk.trQ_extra[k] = float(per.mean())
        blk.trQ_se[k] = float(per.std(ddof=1) / math.sqrt(probes)) if probes > 1 else 0.0
        Rprobe += per
        dQ_est.append((k, prod.mean(axis=0)))
        cumQ += max(per.mean(), 0.0)
    blk._dQ_est = dQ_est  # type: ignore[attr-defined]
    blk.R_tail = _tail_geo(m, rq, (dQ_est[-1][0] if dQ_est else kex))  # type: ignore[attr-defined]
    blk.kQ = dQ_est[-1][0] if dQ_est else kex  # type: ignore[attr-defined]
    if blk.rhoQ >= 1 - DIVERGENCE_TOL:
        blk.r = np.full(c, _INF)
    else:
        exact = sum(blk.dQ)
        r = exact.copy()
        for _, d in dQ_est:
            r = r + d
        blk.r = np.maximum(r, exact)
        blk.R_se = float(Rprobe.std(ddof=1) / math.sqrt(probes)) if probes > 1 and dQ_est else 0.0
    # B powers: tr B^k for k > kex (Fu series up to 2·K_mc, and r2)
    YB = Z
    rB = blk.rhoB
    Fprobe = np.zeros(probes)
    cumF = float(blk.dB[1].sum()) / zeta_n if zeta_n > 0 else 0.0
    for k in range(1, min(2 * K_mc, max(kex, _HUTCH_KMAX_B)) + 1):
        YB = mvB(YB)
        if k <= kex:
            continue
        if k % 2 == 1 and zeta_n > 0 and rB**2 < zeta_n and k > 3:
            se = float(Fprobe.std(ddof=1) / math.sqrt(probes)) if probes > 1 else 0.0
            if _tail_geo(m, rB**2 / zeta_n, (k - 1) // 2) <= max(1e-12 * max(cumF, 1e-300), se):
                break
        per = (Z[:, idx] * YB[:, idx]).sum(axis=1)
        if k % 2 == 0 and zeta_n > 0:
            Fprobe += per / zeta_n ** (k // 2)
            cumF += max(per.mean(), 0.0) / zeta_n ** (k // 2)
        blk.trB_extra[k] = float(per.mean())
        blk.trB_se[k] = float(per.std(ddof=1) / math.sqrt(probes)) if probes > 1 else 0.0
    kB = max([kex] + list(blk.trB_extra))
    blk.F_se = float(Fprobe.std(ddof=1) / math.sqrt(probes)) if probes > 1 else 0.0  # type: ignore[attr-defined]
    blk.F_tail = (_tail_geo(m, rB**2 / zeta_n, kB // 2) if zeta_n > 0 else 0.0)  # type: ignore[attr-defined]
    return blk


def _rho_masked(mv, mask: np.ndarray) -> tuple[float, tuple[float, float], np.ndarray]:
    """Perron root of an irreducible block given by a masked matvec: shifted power iteration with
    the Collatz–Wielandt bracket (certified); ARPACK ``eigs(k=1)`` when it converges slowly."""
    n = mask.size
    x0 = mask.astype(np.float64)
    # unshifted power iteration first (fastest when the block is aperiodic with a spectral gap); its
    # bracket is kept only if it reached the 1e-12 width with every state of the block positive,
    # otherwise the shifted iteration continues from the last vector (periodic or slow blocks)
    ok = False
    x = x0
    w_prev = _INF
    for _ in range(3):  # up to 3 x 20 steps while the bracket keeps shrinking fast
        lo, hi, x = _cw_iterate(mv, x, 20, shift=0.0, stop_width=1e-12)
        if not (np.all(np.isfinite(x)) and np.count_nonzero(x > 0) == np.count_nonzero(mask)):
            break
        w = (hi - lo) / max(hi, 1e-300)
        if w <= 1e-12:
            ok = True
            break
        if not w < 1e-3 * w_prev:
            break
        w_prev = w
    if not ok:
        y0 = mv(x0)
        mean_row = float(y0[mask].mean()) if mask.any() else 0.0  # ≈ ρ for near-regular blocks
        shift = 0.25 * mean_row if mean_row > 0 else 1.0
        xs = np.where(mask, np.maximum(x, x.max(initial=0.0) * 1e-12), 0.0) if np.all(np.isfinite(x)) and x.max(initial=0.0) > 0 else x0
        lo, hi, x = _cw_iterate(mv, xs, 200, shift=shift, stop_width=1e-12, adaptive=True)
    if hi - lo > 1e-10 * max(hi, 1e-300):
        try:
            L = spla.LinearOperator((n, n), matvec=lambda v: mv(np.ravel(v)), dtype=np.float64)
            vals, vecs = spla.eigs(L, k=1, which="LM", v0=x, tol=1e-13, maxiter=5000, ncv=min(n - 1, 24))
            rho = float(abs(vals[0]))
            y = np.abs(vecs[:, 0].real) * mask
            y = np.where(mask, np.maximum(y, y.max() * 1e-12), 0.0)
            lo2, hi2, x2 = _cw_iterate(mv, y, 300, shift=rho, stop_width=1e-12)
            if hi2 - lo2 < hi - lo:
                lo, hi, x = lo2, hi2, x2
        except Exception:  # ARPACK failure: keep the power-iteration bracket
            pass
    return 0.5 * (lo + hi), (lo, hi), x


# --------------------------------------------------------------------------------------------
# greedy functional graph (spec §5) — the ONE implementation (graph.py builds views on it)
# --------------------------------------------------------------------------------------------


def greedy_next(A) -> np.ndarray:
    """``f(i) = argmax_j A_ij`` over all ``n+1`` columns, ties to the lowest index (spec §5);
    ``A`` in spec layout (``<eos>`` last). Returns ``n`` integers (``n`` means ``<eos>``)."""
    if sp.issparse(A):
        return _greedy_next_sparse(sp.csr_matrix(A), None)
    A = np.asarray(A, dtype=np.float64)
    n = A.shape[0] - 1
    return np.argmax(A[:n], axis=1).astype(np.int64)


def _greedy_next_csr(Bst: sp.csr_matrix, b: np.ndarray, u: np.ndarray | None) -> np.ndarray:
    """Greedy ``f`` from the stored non-eos part (sorted CSR), the <eos> column ``b`` and the
    residual value ``u_i`` of each unstored non-eos entry; ties to the lowest index."""
    n = Bst.shape[0]
    indptr, indices, data = Bst.indptr, Bst.indices, Bst.data
    lens = np.diff(indptr)
    nz = lens > 0
    rowmax = np.full(n, -1.0)
    if nz.any():
        rowmax[nz] = np.maximum.reduceat(data, indptr[:-1][nz])
    rows = np.repeat(np.arange(n, dtype=np.int32 if n < 2**31 - 1 else np.int64), lens)
    pos = np.flatnonzero(data == rowmax[rows])
    rp = rows[pos]  # non-decreasing: the first hit of each row is its lowest-column maximum
    first = np.ones(rp.size, dtype=bool)
    first[1:] = rp[1:] != rp[:-1]
    f = np.full(n, n, dtype=np.int64)
    f[rp[first]] = indices[pos[first]]
    f[b > rowmax] = n  # <eos> strictly larger (its index n is the highest, so ties stay)
    best = np.maximum(rowmax, b)
    if u is not None and np.any(u > 0):
        for i in np.flatnonzero((u > 0) & (u >= best)):
            j0 = _lowest_unstored(indices[indptr[i] : indptr[i + 1]], n)
            if j0 >= n:
                continue
            f[i] = j0 if u[i] > best[i] else min(f[i], j0)
    return f


def _lowest_unstored(stored: np.ndarray, n: int) -> int:
    """The lowest column in ``[0, n)`` not among the sorted ``stored`` columns (``n`` if none)."""
    j0 = 0
    for s in stored[stored < n]:
        if s == j0:
            j0 += 1
        elif s > j0:
            break
    return j0


def _greedy_next_sparse(A: sp.csr_matrix, u: np.ndarray | None) -> np.ndarray:
    """Row argmax of a CSR matrix over all n+1 columns, unstored non-eos entries valued ``u_i``."""
    A = A.tocsr()
    A.sort_indices()
    N = A.shape[0]
    n = N - 1
    indptr, indices, data = A.indptr[: n + 1], A.indices, A.data
    lens = np.diff(indptr)
    rows = np.repeat(np.arange(n), lens)
    nz = lens > 0
    rowmax = np.full(n, -1.0)
    if data[: indptr[-1]].size:
        rm = np.maximum.reduceat(data[: indptr[-1]], indptr[:-1][nz]) if nz.any() else np.zeros(0)
        rowmax[nz] = rm
    d = data[: indptr[-1]]
    is_max = d == rowmax[rows]
    first = np.full(n, n, dtype=np.int64)
    pos = np.flatnonzero(is_max)
    # first (lowest column) maximum per row: positions are in row order with sorted columns
    rr = rows[pos]
    uniq, firstpos = np.unique(rr, return_index=True)
    first[uniq] = indices[pos[firstpos]]
    f = first
    f[~nz] = n  # an empty row: only <eos> (or residual) remains
    if u is not None and np.any(u > 0):
        for i in np.flatnonzero(u > 0):
            j0 = _lowest_unstored(indices[indptr[i] : indptr[i + 1]], n)  # lowest unstored non-eos column
            if j0 >= n:
                continue
            if u[i] > rowmax[i]:
                f[i] = j0
            elif u[i] == rowmax[i]:
                f[i] = min(f[i], j0)
    return f


def greedy_graph(next_: Sequence[int] | np.ndarray, n: int | None = None) -> dict:
    """The greedy functional graph of spec §5 from ``f`` (``next_``; value ``n`` = ``<eos>``).

    Vectorised pointer jumping, O(n log n) array work and no per-state Python loop: the states on
    cycles are the image of ``f^(2^L)`` (``2^L > n``), distances to the first cycle state or to
    ``<eos>`` and each cycle's smallest member come from doubling. Same output as the one-pass
    three-colour walk :func:`_greedy_graph_walk` (the reference, kept for the tests): the ``greedy``
    block of spec §12.
    """
    f = np.asarray(next_, dtype=np.int64).ravel()
    if n is None:
        n = f.size
    n = int(n)
    if n == 0 or f.size != n:
        return _greedy_graph_walk(f, n)
    N = n + 1
    F = np.empty(N, dtype=np.int64)
    F[:n] = f
    F[n] = n  # <eos> absorbing
    L = max(1, int(N).bit_length())  # 2^L > N: after 2^L steps every walk sits on its final cycle
    g = F
    for _ in range(L):
        g = g[g]
    on_cycle = np.zeros(N, dtype=bool)
    on_cycle[g] = True
    on_cycle[n] = False
    term = on_cycle.copy()
    term[n] = True
    ar = np.arange(N, dtype=np.int64)
    h = np.where(term, ar, F)  # stop at the first cycle state or at <eos>
    d = (~term).astype(np.int64)
    mn = ar.copy()  # smallest state among f^j(x), j < 2^r (the cycle's minimum on cycle states)
    g = F
    for _ in range(L):
        d = d + d[h]
        h = h[h]
        mn = np.minimum(mn, mn[g])
        g = g[g]
    reps = np.flatnonzero(on_cycle[:n] & (mn[:n] == ar[:n]))  # sorted: cycle order of the spec
    fl = f.tolist()
    cycles = []
    for r in reps.tolist():
        cyc = [r]
        y = fl[r]
        while y != r:
            cyc.append(y)
            y = fl[y]
        cycles.append(cyc)
    last = h[:n]
    fate = np.full(n, -1, dtype=np.int64)
    to_cyc = last < n
    fate[to_cyc] = np.searchsorted(reps, mn[last[to_cyc]])
    basin = np.bincount(fate[to_cyc], minlength=len(cycles)) if len(cycles) else np.zeros(0, np.int64)
    indeg_all = np.bincount(f, minlength=n + 1)
    indeg = indeg_all[:n]
    loop_fraction = float(basin.sum()) / n
    return {
        "next": fl,
        "cycles": cycles,
        "cycle_lengths": [len(c) for c in cycles],
        "basin_sizes": basin.tolist(),
        "fate": fate.tolist(),
        "steps_to_fate": d[:n].tolist(),
        "loop_fraction": loop_fraction,
        "terminate_fraction": 1.0 - loop_fraction,
        "indegree": indeg.tolist(),
        "indegree_eos": int(indeg_all[n]),
        "max_indegree_token": int(np.argmax(indeg)),
    }


def _greedy_graph_walk(next_: Sequence[int] | np.ndarray, n: int | None = None) -> dict:
    """The greedy functional graph of spec §5 from ``f`` (``next_``; value ``n`` = ``<eos>``).

    One O(n) pass with three colours. Returns the ``greedy`` block of spec §12: ``next``,
    ``cycles`` (each rotated to its smallest member, sorted by it), ``cycle_lengths``,
    ``basin_sizes``, ``fate`` (cycle index or −1 for ``<eos>``), ``steps_to_fate`` (0 on a cycle,
    transitions to the first cycle state, or transitions until ``<eos>`` is emitted),
    ``loop_fraction``, ``terminate_fraction``, ``indegree``, ``indegree_eos``, ``max_indegree_token``.
    """
    f = np.asarray(next_, dtype=np.int64)
    if n is None:
        n = f.size
    EOS = n
    color = np.zeros(n, dtype=np.int8)  # 0 unvisited, 1 on path, 2 done
    fate_raw = np.full(n, -2, dtype=np.int64)  # cycle id (by discovery) or -1
    steps = np.zeros(n, dtype=np.int64)
    cycles_raw: list[list[int]] = []
    for s in range(n):
        if color[s]:
            continue
        path = []
        x = s
        while x != EOS and color[x] == 0:
            color[x] = 1
            path.append(x)
            x = int(f[x])
        if x == EOS:
            fate_x, steps_x, cyc_start = -1, 0, None
        elif color[x] == 1:  # new cycle, starts at x within path
            cyc_start = path.index(x)
            cyc = path[cyc_start:]
            cid = len(cycles_raw)
            cycles_raw.append(cyc)
            for y in cyc:
                fate_raw[y] = cid
                steps[y] = 0
                color[y] = 2
            path = path[:cyc_start]
            fate_x, steps_x = cid, 0
        else:
            fate_x, steps_x = int(fate_raw[x]), int(steps[x])
        # label the remaining path backwards
        for y in reversed(path):
            steps_x = steps_x + 1
            fate_raw[y] = fate_x
            steps[y] = steps_x
            color[y] = 2
    # canonical cycle order
    canon = []
    for cid, cyc in enumerate(cycles_raw):
        k = int(np.argmin(cyc))
        canon.append((cyc[k:] + cyc[:k], cid))
    canon.sort(key=lambda t: t[0][0])
    remap = np.full(len(cycles_raw) + 1, -1, dtype=np.int64)
    for new, (_, old) in enumerate(canon):
        remap[old] = new
    fate = np.where(fate_raw >= 0, remap[np.maximum(fate_raw, 0)], -1)
    cycles = [[int(v) for v in cyc] for cyc, _ in canon]
    basin = np.bincount(fate[fate >= 0], minlength=len(cycles)) if len(cycles) else np.zeros(0, np.int64)
    indeg_all = np.bincount(f, minlength=n + 1)
    indeg = indeg_all[:n]
    loop_fraction = float(basin.sum()) / n if n else 0.0
    return {
        "next": [int(v) for v in f],
        "cycles": cycles,
        "cycle_lengths": [len(c) for c in cycles],
        "basin_sizes": [int(v) for v in basin],
        "fate": [int(v) for v in fate],
        "steps_to_fate": [int(v) for v in steps],
        "loop_fraction": loop_fraction,
        "terminate_fraction": 1.0 - loop_fraction,
        "indegree": [int(v) for v in indeg],
        "indegree_eos": int(indeg_all[n]),
        "max_indegree_token": int(np.argmax(indeg)) if n else 0,
    }


# --------------------------------------------------------------------------------------------
# termination (spec §6)
# --------------------------------------------------------------------------------------------


def _reach_to(ch: _Chain, targets_mask: np.ndarray, include_eos: bool) -> np.ndarray:
    """States (of the n) that can reach a target state (or <eos> if include_eos), incl. targets.

    Reverse BFS from a super-sink on the support graph (with the virtual residual node), O(nnz)."""
    n = ch.n
    if "GT" not in ch.ops:
        if not ch.dense and not np.any(ch.u):
            ch.ops["GT"] = ch.BT_op().CT  # Bᵀ (positive data) is the transposed support structure
        else:
            ch.ops["GT"] = ch.support_graph().T.tocsr()
    GT = ch.ops["GT"]
    Nn = GT.shape[0]
    srcm = np.array(targets_mask, dtype=bool)
    if include_eos:
        srcm |= ch.b > 0
    src = np.flatnonzero(srcm).astype(GT.indices.dtype)  # sorted, unique
    indptr = np.concatenate([GT.indptr, [GT.indptr[-1] + src.size]])
    indices = np.concatenate([GT.indices, src])
    # float64 data: csgraph would otherwise convert the whole graph to float64 on every call
    R = sp.csr_matrix((np.ones(indices.size), indices, indptr), shape=(Nn + 1, Nn + 1))
    order = csgraph.breadth_first_order(R, Nn, directed=True, return_predecessors=False)
    mask = np.zeros(Nn + 1, dtype=bool)
    mask[order] = True
    return mask[:n]


def _solve_sub(ch: _Chain, idx: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve ``(I − B_II) x = rhs`` on the index set ``idx``."""
    c = idx.size
    if c == 0:
        return np.zeros(0)
    if ch.dense or c <= DENSE_MAX_STATES:
        M = np.eye(c) - ch.block_dense(idx, "B")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
            x = scipy.linalg.solve(M, rhs, check_finite=False)
        if caught:  # I − B nearly singular: some states reach <eos> with probability ~0 (noted in the output)
            rcond = 1.0 / max(np.linalg.cond(M, 1), 1.0)
            ch.worst_rcond = rcond if ch.worst_rcond is None else min(ch.worst_rcond, rcond)
        return x
    Bf = ch.op("B")
    n = ch.n
    if c >= n // 2:
        # most states: GMRES on the full space with I − D B D (D = the indicator of idx) and the
        # right-hand side zero outside idx. Its Krylov vectors vanish outside idx exactly, so the
        # iterates are those of the restricted system, without two index gathers per product.
        out_mask = np.ones(n, dtype=bool)
        out_mask[idx] = False
        outside = np.flatnonzero(out_mask)

        def mv(x):
            x = np.ravel(x)
            y = Bf.matvec(x)
            y[outside] = 0.0
            return x - y

        full_rhs = np.zeros(n)
        full_rhs[idx] = rhs
        L = spla.LinearOperator((n, n), matvec=mv, dtype=np.float64)
        xf, info = spla.gmres(L, full_rhs, rtol=1e-13, atol=0.0, restart=40, maxiter=200)
        x = np.asarray(xf)[idx]
    else:
        def mv(x):
            full = np.zeros(n)
            full[idx] = np.ravel(x)
            return np.ravel(x) - Bf.matvec(full)[idx]

        L = spla.LinearOperator((c, c), matvec=mv, dtype=np.float64)
        x, info = spla.gmres(L, rhs, rtol=1e-13, atol=0.0, restart=40, maxiter=200)
    if info != 0:
        Bo = Bf.block(idx)
        Mx = sp.identity(c, format="csc") - Bo.explicit().tocsc()
        x = spla.spsolve(Mx, rhs)
    return np.asarray(x)


def _termination(ch: _Chain) -> tuple[np.ndarray, np.ndarray]:
    n = ch.n
    T = _reach_to(ch, np.zeros(n, bool), include_eos=True)
    a = np.zeros(n)
    idxT = np.flatnonzero(T)
    if idxT.size:
        a[idxT] = _solve_sub(ch, idxT, ch.b[idxT])
    a = np.clip(a, 0.0, 1.0)
    bad = ~T
    tau = np.full(n, _INF)
    if bad.any():
        reach_bad = _reach_to(ch, bad, include_eos=False)
        U = ~reach_bad
    else:
        U = np.ones(n, bool)
    idxU = np.flatnonzero(U)
    if idxU.size:
        tau[idxU] = _solve_sub(ch, idxU, np.ones(idxU.size))
        a[idxU] = 1.0
    return a, tau


# --------------------------------------------------------------------------------------------
# Monte Carlo (spec §12 mc block)
# --------------------------------------------------------------------------------------------


def default_mc_trajectories(n: int) -> int:
    """Trajectories per start state: ``clip(200000 // n, 2, 1000)`` (n·M ≤ 2e5 keeps it cheap)."""
    return int(min(1000, max(2, 200000 // max(n, 1))))


class _Sampler:
    """Vectorised sampler of the chain: per row the stored non-eos entries, then ``<eos>``, then a
    residual pseudo-entry (resolved uniformly over the unstored non-eos columns)."""

    def __init__(self, ch: _Chain):
        n = ch.n
        self.n = n
        if ch.dense:
            Bs = sp.csr_matrix(ch.Bd)
            u = np.zeros(n)
        else:
            Bs = ch.Bst
            u = ch.u
        Bs.sort_indices()
        K = np.diff(Bs.indptr)
        cnt = K + 2
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(cnt, out=indptr[1:])
        tot = int(indptr[-1])
        start = indptr[:-1]
        # positions of the stored entries: each row's block shifted by 2 per previous row
        pdt = np.int32 if tot < 2**31 - 1 else np.int64
        posS = np.arange(Bs.indices.size, dtype=pdt)
        posS += np.repeat(2 * np.arange(n, dtype=pdt), K)
        cols = np.empty(tot, dtype=np.int32)
        cols[posS] = Bs.indices
        cols[start + K] = n
        cols[start + K + 1] = -1
        self.hmax = 1 << max(0, int(cnt.max(initial=1)).bit_length())  # power of two > max slots per row
        padded = (tot + self.hmax + 16 + 7) // 8 * 8
        cum_pad = np.empty(padded)
        cum_pad[tot:] = np.inf  # the branchless search below may look past the last row
        cum = cum_pad[:tot]
        cum[posS] = Bs.data
        del posS
        cum[start + K] = ch.b
        cum[start + K + 1] = u * (n - K)
        np.cumsum(cum, out=cum)
        base = np.zeros(n)
        if n > 1:
            base[1:] = cum[indptr[1:-1] - 1]
        base -= 2.0 * np.arange(n)  # monotone: row i occupies [2i, 2i + total)
        cum -= np.repeat(base, cnt)
        self.rowtot = cum[indptr[1:] - 1] - 2.0 * np.arange(n)
        self.cumg = cum_pad
        self.coarse = np.ascontiguousarray(cum_pad[7::8])  # last value of each aligned group of 8 slots
        self.hq = 1 << max(0, int(self.hmax // 8 + 3).bit_length())  # power of two > hmax/8 + 2
        self.indptr = indptr
        self.pidx = np.int32 if padded < 2**31 - 1 else np.int64
        self.depth = int(np.ceil(np.log2(int(cnt.max(initial=1)) + 1))) + 1
        self.cols = cols
        self.Bs = Bs

    def _keys(self) -> np.ndarray:
        """Sorted ``row·n + col`` of the stored entries (built on the first residual draw)."""
        if getattr(self, "_k", None) is None:
            Bs = self.Bs
            rows = np.repeat(np.arange(self.n, dtype=np.int64), np.diff(Bs.indptr))
            self._k = rows * self.n + Bs.indices
        return self._k

    def step(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n = self.n
        alive = x < n
        out = np.full_like(x, n)
        xs = x[alive]
        if xs.size == 0:
            return out
        # group by state (monotone gathers below: far fewer cache misses); a 16-bit key is enough for
        # locality and lets numpy use its radix sort (~6x faster than sorting the full indices)
        sh = max(0, int(n).bit_length() - 16)
        key = (xs >> sh).astype(np.uint16) if sh < 63 else xs
        srt = np.argsort(key, kind="stable")
        xs = xs[srt]
        uu = rng.random(xs.size) * self.rowtot[xs]
        target = xs * 2.0 + uu
        # first position p >= start(x) with cumg[p] > target. cumg is globally increasing (row i lies
        # in [2i, 2i + 1 + eps)), so that is the first such position overall: cumg[start - 1] <= target
        # and positions past the row's end compare larger. Two branchless binary searches with
        # power-of-two steps: over the groups of 8 slots (``coarse``, the last value of each group),
        # then inside the group found — about 2 cache lines per draw instead of one per step.
        start = self.indptr[xs].astype(self.pidx)
        q = start // 8 - 1  # a group whose last value is <= target (or -1)
        h = self.hq >> 1  # steps sum to hq - 1 >= the groups a row can span
        while h >= 1:
            ok = self.coarse[q + h] <= target
            np.add(q, h, out=q, where=ok)
            h >>= 1
        p = 8 * q + 7  # last slot of the last group <= target: the answer lies in the next group
        h = 4
        while h >= 1:
            ok = self.cumg[p + h] <= target
            np.add(p, h, out=p, where=ok)
            h >>= 1
        pos = np.minimum(p + 1, self.indptr[xs + 1] - 1)
        nxt = self.cols[pos]
        res = np.flatnonzero(nxt < 0)
        if res.size:
            rows = xs[res]
            pending = np.arange(res.size)
            choice = np.empty(res.size, dtype=np.int64)
            while pending.size:
                cand = rng.integers(0, n, size=pending.size)
                r = rows[pending]
                keys = self._keys()
                want = r.astype(np.int64) * n + cand
                k = np.minimum(np.searchsorted(keys, want), max(keys.size - 1, 0))
                stored = (keys[k] == want) if keys.size else np.zeros(pending.size, bool)
                choice[pending[~stored]] = cand[~stored]
                pending = pending[stored]
            nxt[res] = choice
        back = np.empty_like(nxt)
        back[srt] = nxt
        out[alive] = back
        return out


def _monte_carlo(ch: _Chain, K: int, M: int, zeta_n: float, seed: int) -> dict:
    n = ch.n
    rng = np.random.default_rng(seed)
    smp = _Sampler(ch)
    starts = np.repeat(np.arange(n, dtype=np.int64), M)
    L = 2 * K
    X = np.empty((L + 1, starts.size), dtype=np.int32 if n < 2**31 - 1 else np.int64)
    X[0] = starts
    for t in range(1, L + 1):
        X[t] = smp.step(X[t - 1], rng)
    cnt = np.zeros(starts.size)
    fu = np.zeros(starts.size)
    for k in range(1, K + 1):
        ok = X[2 * k] < n
        ev = ok.copy()
        for j in range(k + 1):
            ev &= X[k + j] == X[j]
        cnt += ev
        if zeta_n > 0:
            fu += (X[2 * k] == X[0]) * zeta_n ** (-k)
    def agg(v):
        per = v.reshape(n, M)
        mean = per.mean(axis=1)
        var = per.var(axis=1, ddof=1) if M > 1 else np.zeros(n)
        return float(mean.sum()), float(math.sqrt(var.sum() / M))
    R_mc, R_se = agg(cnt)
    F_mc, F_se = agg(fu)
    return {"R": R_mc, "R_se": R_se, "F": F_mc, "F_se": F_se}


# --------------------------------------------------------------------------------------------
# public single-quantity helpers (dense matrices in spec layout, eos last)
# --------------------------------------------------------------------------------------------


def _B(A) -> np.ndarray:
    A = A.toarray() if sp.issparse(A) else np.asarray(A, dtype=np.float64)
    n = A.shape[0] - 1
    return A[:n, :n]


def sparsity(A) -> tuple[float, float]:
    """FU21 Def. 2.2: ``(ζ, ζn) = (nnz/n², nnz/n)`` with ``nnz = #{B_ij > 0}`` (keys ``zeta``, ``zeta_n``)."""
    B = _B(A)
    n = B.shape[0]
    nnz = int((B > 0).sum())
    return nnz / n**2, nnz / n


def row_collision(A) -> np.ndarray:
    """``s_i = Σ_j B_ij²`` (spec §1, key ``row_collision_B``)."""
    B = _B(A)
    return (B * B).sum(axis=1)


def row_collision_full(A) -> np.ndarray:
    """``Σ_j A_ij²`` over all ``n+1`` columns for the ``n`` token rows (spec §12 policy case)."""
    if sp.issparse(A):
        M = sp.csr_matrix(A)
        n = M.shape[0] - 1
        return np.asarray(M[:n].multiply(M[:n]).sum(axis=1)).ravel()
    A = np.asarray(A, dtype=np.float64)
    n = A.shape[0] - 1
    return (A[:n] ** 2).sum(axis=1)


def flows(A) -> dict:
    """One- and two-step flows (spec §1): ``inflow_1``, ``outflow_1``, ``inflow_2``, ``outflow_2``."""
    B = _B(A)
    one = np.ones(B.shape[0])
    return {
        "inflow_1": B.T @ one,
        "outflow_1": B @ one,
        "outflow_2": B @ (B @ one),
        "inflow_2": B.T @ (B.T @ one),
    }


def cyclic_sccs(A) -> list[list[int]]:
    """Cyclic SCCs of ``S = 1[B > 0]`` (≥ 2 states or a self-loop), sorted (key ``cyclic_sccs``)."""
    B = _B(A)
    ch = _Chain(n=B.shape[0], dense=True, b=np.zeros(B.shape[0]), Bd=B)
    return [g.tolist() for g in _sccs(ch)]


def spectral_radius(M) -> float:
    """``ρ(M) = max |λ(M)|`` by LAPACK ``geev`` (dense)."""
    M = M.toarray() if sp.issparse(M) else np.asarray(M, dtype=np.float64)
    if M.size == 0:
        return 0.0
    return float(np.max(np.abs(np.linalg.eigvals(M))))


def frobenius_interval(A) -> list[float]:
    """SU21's Frobenius interval ``[min_i s_i, max_i s_i] ∋ ρ(Q)`` (key ``frobenius_interval_rho_Q``)."""
    s = row_collision(A)
    return [float(s.min()), float(s.max())]


def su_repetition_sum(A) -> tuple[float, np.ndarray]:
    """SU21 eq. (r): ``R = tr(Q(I−Q)^{-1})`` and ``r_i = [Q(I−Q)^{-1}]_ii`` computed per SCC
    (``+inf`` in SCCs with ``ρ(Q_C) ≥ 1 − 1e-12``). Keys ``su_R``, ``su_R_per_state``."""
    q = compute_quantities(A, mc_trajectories=2, lower_bounds_K=1, route="dense")["quantities"]
    return q["su_R"], np.asarray(q["su_R_per_state"], dtype=float)


def su_lower_bounds(A, K: int = 60) -> tuple[float, float]:
    """The rigorous Cauchy–Schwarz lower bounds of spec §3.3 (``su_lower_bound_trace_cs``,
    ``su_lower_bound_diag_cs``) with ``K`` terms."""
    q = compute_quantities(A, mc_trajectories=2, lower_bounds_K=K, route="dense")["quantities"]
    return q["su_lower_bound_trace_cs"], q["su_lower_bound_diag_cs"]


def su_estimate_r2(A) -> float:
    """SU21 eq. (r-2) ``Σ_{j,l} λ_jλ_l/(ζn − λ_jλ_l)`` (estimate; ``inf`` if ``ζn ≤ ρ(B)² + 1e-12``)."""
    return compute_quantities(A, mc_trajectories=2, lower_bounds_K=1, route="dense")["quantities"]["su_estimate_r2"]


def fu_arp(A) -> float:
    """FU21 published ARP ``R_Fu = tr(B²(ζnI − B²)^{-1})`` (Theorem 1 closed form; key ``fu_arp``)."""
    return compute_quantities(A, mc_trajectories=2, lower_bounds_K=1, route="dense")["quantities"]["fu_arp"]


def fu_arp_corrected(A) -> float:
    """Su's corrected ARP ``Σ_k tr(B^k∘B^k)/(ζn)^k`` (key ``fu_arp_corrected``)."""
    return compute_quantities(A, mc_trajectories=2, lower_bounds_K=1, route="dense")["quantities"]["fu_arp_corrected"]


def fu_theorem1_bounds(A) -> dict:
    """FU21 Theorem 1, Corollaries 1.1 and 1.2 (the ``fu_bounds`` object of spec §12)."""
    return compute_quantities(A, mc_trajectories=2, lower_bounds_K=1, route="dense")["quantities"]["fu_bounds"]


def termination(A) -> tuple[np.ndarray, np.ndarray]:
    """``(p_eos, expected_steps_to_eos)`` of spec §6 (keys ``p_eos``, ``expected_steps_to_eos``)."""
    A = A.toarray() if sp.issparse(A) else np.asarray(A, dtype=np.float64)
    ch = _Chain.build(A, None, dense=True)
    return _termination(ch)


def occupation(A, pi0=None, T: int = 20) -> np.ndarray:
    """``ν = (1/T) Σ_{t<T} π0ᵀ B^t`` (spec §7, key ``occupation.nu``); ``π0`` uniform by default."""
    B = _B(A)
    n = B.shape[0]
    v = np.full(n, 1.0 / n) if pi0 is None else np.asarray(pi0, dtype=np.float64)
    nu = np.zeros(n)
    for _ in range(T):
        nu += v
        v = B.T @ v
    return nu / T


def traces_k_limit(out_degree: np.ndarray) -> int:
    """``K_t``: the largest ``K ∈ {1..6}`` with ``Σ_i max(d_i, 1)^K ≤ 3·10⁵`` (1 if none)."""
    d = np.maximum(np.asarray(out_degree, dtype=np.float64), 1.0)
    K_t = 1
    for K in range(2, 7):
        if float(np.sum(d**K)) <= 3e5:
            K_t = K
        else:
            break
    return K_t


def theorem2_rhs(zeta_n: float, delta2: float, a: Sequence[float] = (0.1, 0.5, 1.0), *, n: int | None = None,
                 column_collision_max: float | None = None) -> dict:
    """FU21 Theorem 2 (spec §4.5): ``Pr(|R − R'| ≥ a) ≤ 3 ζn δ² / (a² (ζn − 4)(ζn − 1))``.

    ``delta2`` is ``δ̂²`` (mean squared trace residual, spec §2.3). Returns
    ``{"applicable": bool, "rhs": {"0.1": v, ...}, "hypotheses": {...}}``; the right-hand side is
    ``inf`` when ``ζn ≤ 4``. Informational only (ambiguity A6): the hypotheses ``max_j Σ_i B_ij² < 1``
    (column-sum reading) and ``δ² < 1/n`` are reported when the inputs are given.
    """
    zn = float(zeta_n)
    d2 = float(delta2)
    ok = zn > 4.0
    rhs = {}
    for av in a:
        key = f"{float(av):g}"
        rhs[key] = 3.0 * zn * d2 / (float(av) ** 2 * (zn - 4.0) * (zn - 1.0)) if ok else _INF
    hyp = {"zeta_n_gt_4": ok}
    if n is not None:
        hyp["delta2_lt_1_over_n"] = bool(d2 < 1.0 / n)
    if column_collision_max is not None:
        hyp["column_collision_lt_1"] = bool(column_collision_max < 1.0)
    return {"applicable": bool(ok and all(hyp.values())), "rhs": rhs, "hypotheses": hyp, "informational": True}


# --------------------------------------------------------------------------------------------
# the main entry
# --------------------------------------------------------------------------------------------


def _f(x) -> float:
    x = float(x)
    if math.isnan(x):  # never leak NaN
        return _INF
    return x


def _flist(v) -> list[float]:
    a = np.array(v, dtype=np.float64).ravel()
    a[np.isnan(a)] = _INF
    return a.tolist()


def _uniform_pi0(n: int) -> np.ndarray:
    return np.full(n, 1.0 / n)


def _prep_pi0(pi0, n: int, order: np.ndarray, eos_was_last: bool) -> np.ndarray:
    if pi0 is None:
        return _uniform_pi0(n)
    p = np.asarray(pi0, dtype=np.float64).ravel()
    if p.size == n + 1:
        p = p[order][:n]
    if p.size != n:
        raise UsageError(f"pi0 must have {n} entries (one per non-eos state); got {p.size}")
    if not np.all(np.isfinite(p)) or (p < 0).any() or abs(p.sum() - 1.0) > ROW_SUM_TOL:
        raise UsageError("pi0 must be a probability distribution over the non-eos states (>= 0, summing to 1)")
    return p


def compute_quantities(
    A,
    eos_index: int | None = None,
    *,
    residual=None,
    pi0=None,
    T: int = 20,
    lower_bounds_K: int = 60,
    mc_K: int = 10,
    mc_trajectories: int | None = None,
    seed: int = 20210126,
    route: str = "auto",
    hutchinson_probes: int = _HUTCH_PROBES,
) -> dict:
    """Every quantity of spec §1–§7 in the JSON layout of spec §12.

    ``A``: dense ``(N, N)`` array or scipy.sparse matrix, row-stochastic (with ``residual``).
    ``eos_index``: the ``<eos>`` state (default last); if not last it is permuted to last and the
    per-token lists follow the remaining states' order. ``pi0``: start distribution over the ``n``
    non-eos states (or ``n+1`` entries in the caller's order, the eos entry dropped); uniform by
    default. ``T``: occupation horizon. ``lower_bounds_K``: terms of the rigorous lower bounds.
    ``mc_K``: the ``K`` of the Monte Carlo block and of ``lsr_trunc``. ``mc_trajectories``:
    trajectories per start state, default :func:`default_mc_trajectories` (``clip(200000 // n,
    2, 1000)``). ``seed``: the only source of randomness (Monte Carlo, Hutchinson probes).
    ``route``: ``"auto"`` (dense iff ``n ≤ 4096``), ``"dense"`` or ``"sparse"``.
    ``hutchinson_probes``: Rademacher probes for SCCs of more than 4096 states (sparse route).

    Monte Carlo (``mc``): ``M`` trajectories from every start state, ``2K`` steps each, counting the
    events ``E_k(0)`` (``k ≤ K``) and the returns ``x_2k = x_0`` weighted by ``ζn^-k``; the standard
    error is ``sqrt(Σ_i var_i / M)`` over start states.
    """
    eos = validate_transition_matrix(A, eos_index, residual)
    N = _shape_of(A)[0]
    M_lay, res, order = to_spec_layout(A, eos, residual)
    n = N - 1
    if route not in ("auto", "dense", "sparse"):
        raise UsageError(f"route must be 'auto', 'dense' or 'sparse'; got {route!r}")
    if route == "auto":
        route = "dense" if n <= DENSE_MAX_STATES else "sparse"
    T = int(T)
    if T < 1:
        raise UsageError("T must be >= 1")
    K_lb = int(lower_bounds_K)
    K_mc = int(mc_K)
    Mtraj = default_mc_trajectories(n) if mc_trajectories is None else int(mc_trajectories)
    if Mtraj < 2:
        raise UsageError("mc_trajectories must be >= 2 (the standard error needs two trajectories per state)")
    p0 = _prep_pi0(pi0, n, order, eos == N - 1)
    ch = _Chain.build(M_lay, res, dense=(route == "dense"))
    partial: list[str] = []
    notes: dict[str, str] = {}
    estimates: dict[str, dict] = {}

    # ---- §1 basics
    deg = ch.out_degree()
    nnz = int(deg.sum())
    zeta = nnz / n**2
    zeta_n = nnz / n
    one = np.ones(n)
    out1 = ch.B_matvec(one)
    in1 = ch.B_rmatvec(one)
    out2 = ch.B_matvec(out1)
    in2 = ch.B_rmatvec(in1)
    if ch.dense:
        s = (ch.Bd * ch.Bd).sum(axis=1)
    else:
        s = ch.op("Q").matvec(one)
    K_t = traces_k_limit(deg)

    # ---- SCCs and blocks
    blocks_idx = _sccs(ch)
    m = int(sum(g.size for g in blocks_idx))
    blocks: list[_Block] = []
    for g in blocks_idx:
        if ch.dense or g.size <= DENSE_MAX_STATES:
            blocks.append(_small_block(ch, g, zeta_n, sparse_mult=not ch.dense))
        else:
            blocks.append(_large_block(ch, g, zeta_n, K_t, K_mc, seed, hutchinson_probes))
    rhoB = max((bk.rhoB for bk in blocks), default=0.0)
    rhoQ = max((bk.rhoQ for bk in blocks), default=0.0)
    exact_all = all(bk.exact for bk in blocks)
    fu_conv = zeta_n > 0 and zeta_n > rhoB**2 + DIVERGENCE_TOL
    for bk in blocks:
        if bk.exact:
            _powers_loop(bk, zeta_n, K_t, K_lb, K_mc, corr_conv=fu_conv, fu_conv=fu_conv, m_tot=float(m), rho_max=rhoB)

    def dlist(bk: _Block, which: str, k: int) -> np.ndarray | None:
        L = getattr(bk, which)
        return L[k - 1] if k <= len(L) else None

    def tr(which: str, k: int) -> float:
        t = 0.0
        for bk in blocks:
            d = dlist(bk, which, k)
            if d is not None:
                t += float(d.sum())
            elif not bk.exact:
                ex = bk.trB_extra if which == "dB" else bk.trQ_extra if which == "dQ" else {}
                t += ex.get(k, 0.0)
        return t

    # ---- Su's R
    r = np.zeros(n)
    for bk in blocks:
        r[bk.idx] = bk.r
    R = _INF if np.isinf(r).any() else float(r.sum())
    if not exact_all:
        partial += ["su_R", "su_R_per_state", "su_R_avg"]
        big = [bk for bk in blocks if not bk.exact]
        estimates["su_R"] = {"se": math.sqrt(sum(bk.R_se ** 2 for bk in big)),
                             "tail_bound": float(sum(bk.R_tail for bk in big))}
        notes["su_R"] = ("SCCs > 4096 states: exact k<=2 traces + Hutchinson estimate of the k>=3 terms "
                         f"({hutchinson_probes} Rademacher probes, k <= {max(bk.kQ for bk in big)}; standard error "
                         f"{math.sqrt(sum(bk.R_se ** 2 for bk in big)):.3g}; certified tail bound m*rho^(K+1)/(1-rho) = "
                         f"{sum(bk.R_tail for bk in big):.3g})")
    div_R = rhoQ >= 1.0 - DIVERGENCE_TOL
    if div_R:
        dom = up_c = up_n = _INF
    else:
        dom = rhoQ / (1.0 - rhoQ)
        up_c, up_n = m * dom, n * dom

    # ---- rigorous lower bounds
    lb_tr = 0.0
    lb_dg = 0.0
    K_lb_eff = K_lb if exact_all else min(K_lb, 2)
    if not exact_all:
        partial += ["su_lower_bound_trace_cs", "su_lower_bound_diag_cs"]
        notes["su_lower_bound_trace_cs"] = "SCCs > 4096 states: only the k<=2 terms (still a valid lower bound, spec §3.5 step 6)"
    # newton sums for tr(S_C^k) where a block stopped early
    for k in range(1, K_lb_eff + 1):
        tB = 0.0
        tS = 0.0
        any_active = False
        for bk in blocks:
            dB = dlist(bk, "dB", k)
            dS = dlist(bk, "dS", k)
            if dB is not None and dS is not None:
                any_active = True
                tB += float(dB.sum())
                tS += float(dS.sum())
                nzs = dS > 0
                lb_dg += float(np.sum(dB[nzs] ** 2 / dS[nzs]))
            else:
                tS += _trace_S_newton(ch, bk, k)
        if not any_active:
            break
        if tS > 0:
            lb_tr += tB * tB / tS

    # ---- Fu's ARP and the Su estimates
    if zeta_n == 0:
        fu = fu_corr = r2 = 0.0
    elif not fu_conv:
        fu = fu_corr = r2 = _INF
    else:
        if exact_all:
            fu = float(sum(bk.fu_closed for bk in blocks))
        else:
            fu = 0.0
            for bk in blocks:
                if bk.exact:
                    fu += bk.fu_closed
                else:
                    fu += float(bk.dB[1].sum()) / zeta_n
                    for k, v in bk.trB_extra.items():
                        if k % 2 == 0 and k >= 4:
                            fu += v / zeta_n ** (k // 2)
            partial.append("fu_arp")
            big = [bk for bk in blocks if not bk.exact]
            estimates["fu_arp"] = {"se": math.sqrt(sum(bk.F_se ** 2 for bk in big)),
                                   "tail_bound": float(sum(bk.F_tail for bk in big))}
            notes["fu_arp"] = ("SCCs > 4096 states: exact tr(B^2) + Hutchinson tr(B^2k) for k >= 2 "
                               f"(standard error {math.sqrt(sum(bk.F_se ** 2 for bk in big)):.3g}; certified tail bound "
                               f"m*q^(K+1)/(1-q), q = rho(B)^2/zeta_n: {sum(bk.F_tail for bk in big):.3g})")
        fu_corr = 0.0
        for bk in blocks:
            for k, d in enumerate(bk.dB, start=1):
                if not bk.exact and k > 2:
                    break
                fu_corr += float(np.dot(d, d)) / zeta_n**k
        if not exact_all:
            partial.append("fu_arp_corrected")
            notes["fu_arp_corrected"] = "SCCs > 4096 states: k<=2 terms of diag(B^k) only (spec §13), a lower estimate"
        if all(bk.eigB is not None for bk in blocks):
            lam = np.concatenate([bk.eigB for bk in blocks]) if blocks else np.zeros(0, complex)
            X = np.outer(lam, lam) / zeta_n
            r2 = float(np.real(np.sum(X / (1.0 - X)))) if lam.size else 0.0
        else:  # the series Σ_k (tr B^k)² / ζn^k with a certified tail (spec §3.3 route 2)
            r2 = 0.0
            for k in range(1, _SERIES_CAP + 1):
                t = 0.0
                for bk in blocks:
                    if bk.eigB is not None:
                        t += float(np.real(np.sum(bk.eigB**k)))
                    elif k <= len(bk.dB):
                        t += float(bk.dB[k - 1].sum())
                    elif not bk.exact:
                        t += bk.trB_extra.get(k, 0.0)
                r2 += t * t / zeta_n**k
                if _tail_geo(float(m) * m, rhoB**2 / zeta_n, k) <= _SERIES_RTOL * max(r2, 1e-300):
                    break
                if not exact_all and k >= 60:
                    break
            if not exact_all:
                partial.append("su_estimate_r2")
                notes["su_estimate_r2"] = "SCCs > 4096 states: series with Hutchinson tr(B^k) for k>=3"
    r3 = n * fu_corr if np.isfinite(fu_corr) else _INF
    if not exact_all:
        partial.append("su_estimate_r3")

    # ---- fu_bounds
    fb = _fu_bounds(ch, zeta_n, rhoB, out2, in2, s, partial, notes, rowB=out1, colB=in1)

    # ---- traces_k
    trk = {"k": list(range(1, K_t + 1)), "tr_B": [], "tr_Q": [], "tr_S": [], "sum_diag_Bk_sq": []}
    for k in range(1, K_t + 1):
        tB = tQ = tS = sq = 0.0
        for bk in blocks:
            dB, dQ, dS = dlist(bk, "dB", k), dlist(bk, "dQ", k), dlist(bk, "dS", k)
            tB += float(dB.sum())
            tQ += float(dQ.sum())
            tS += float(dS.sum())
            sq += float(np.dot(dB, dB))
        trk["tr_B"].append(tB)
        trk["tr_Q"].append(tQ)
        trk["tr_S"].append(int(round(tS)))
        trk["sum_diag_Bk_sq"].append(sq)

    # ---- greedy
    if ch.dense:
        f = np.argmax(np.concatenate([ch.Bd, ch.b[:, None]], axis=1), axis=1).astype(np.int64)
    else:
        f = _greedy_next_csr(ch.Bst, ch.b, ch.u)
    gr = greedy_graph(f, n)
    has_cycle = len(gr["cycles"]) > 0
    g_zn = float(np.sum(f < n)) / n
    greedy_matrix = {"zeta_n": g_zn, "su_R": _INF if has_cycle else 0.0,
                     "fu_arp": (_INF if has_cycle else 0.0) if g_zn > 0 else 0.0}

    # ---- termination
    a, tau = _termination(ch)
    if not ch.dense and n > DENSE_MAX_STATES:
        notes["p_eos"] = "GMRES on I - B_TT (rtol 1e-13), sparse LU fallback"
    if ch.worst_rcond is not None:
        notes["expected_steps_to_eos"] = (
            f"I - B nearly singular (reciprocal condition {ch.worst_rcond:.1e}): some states reach <eos> with "
            "probability near 0, so their p_eos and expected steps carry relative errors up to ~1e-16 / rcond")

    # ---- Monte Carlo
    su_trunc = 0.0
    fu_trunc = 0.0
    mc_partial = False
    for k in range(1, K_mc + 1):
        su_trunc += tr("dQ", k)
        if zeta_n > 0:
            fu_trunc += tr("dB", 2 * k) / zeta_n**k
    if not exact_all:
        mc_partial = True
    mc = _monte_carlo(ch, K_mc, Mtraj, zeta_n, seed)
    mcb = {
        "K": K_mc,
        "trajectories_per_state": Mtraj,
        "su_R_trunc_exact": su_trunc,
        "su_R_trunc_mc": mc["R"],
        "su_R_trunc_se": mc["R_se"],
        "fu_arp_trunc_exact": fu_trunc,
        "fu_arp_trunc_mc": mc["F"],
        "fu_arp_trunc_se": mc["F_se"],
    }
    if mc_partial:
        partial += ["mc.su_R_trunc_exact", "mc.fu_arp_trunc_exact"]
        notes["mc.su_R_trunc_exact"] = "SCCs > 4096 states: k>=3 traces by Hutchinson"

    # ---- occupation
    nu = np.zeros(n)
    v = p0.copy()
    for t in range(T):
        nu += v
        if t < T - 1:  # the product after the last step is never used
            v = ch.B_rmatvec(v)
    nu /= T
    with np.errstate(invalid="ignore"):
        lsr = _INF if np.any((nu > 0) & np.isinf(r)) else float(np.sum(nu[np.isfinite(r)] * r[np.isfinite(r)]))
    r_tr = np.zeros(n)
    for bk in blocks:
        acc = np.zeros(bk.size)
        for k in range(1, K_mc + 1):
            d = dlist(bk, "dQ", k)
            if d is not None:
                acc += d
            elif not bk.exact:
                for kk, dd in getattr(bk, "_dQ_est", []):
                    if kk == k:
                        acc += dd
        r_tr[bk.idx] = acc
    lsr_trunc = float(np.dot(nu, r_tr))
    if not exact_all:
        partial += ["occupation.lsr", "occupation.lsr_trunc"]
    # greedy cycle occupancy
    onc = np.zeros(n, bool)
    for cyc in gr["cycles"]:
        onc[cyc] = True
    vg = p0.copy()
    nug = np.zeros(n)
    live = f < n
    for _ in range(T):
        nug += vg
        vg = np.bincount(f[live], weights=vg[live], minlength=n + 1)[:n]
    nug /= T
    gco = float(nug[onc].sum())

    # ---- CW bracket
    if ch.dense:
        Qd = ch._Qd()
        Qm = sp.csr_matrix(Qd) if np.count_nonzero(Qd) < 0.1 * Qd.size else Qd
        lo, hi, _ = _cw_iterate(lambda x: Qm @ x, np.ones(n), _CW_ITERS)
        cw = [lo, hi]
    else:
        cw = [max((bk.cw[0] for bk in blocks), default=0.0), max((bk.cw[1] for bk in blocks), default=0.0)]
        partial.append("collatz_wielandt_rho_Q")
        notes["collatz_wielandt_rho_Q"] = "[max_C lo_C, max_C hi_C] of per-SCC Collatz-Wielandt brackets (certified, tighter than the whole-matrix iteration)"
    if not exact_all:
        partial += ["rho_B", "rho_B2", "rho_Q"]
        notes["rho_Q"] = "SCCs > 4096 states: ARPACK eigs(k=1) refined inside the Collatz-Wielandt bracket"

    top = np.argsort(-in1, kind="stable")[: min(5, n)]
    q = {
        "zeta": zeta,
        "zeta_n": zeta_n,
        "row_collision_B": _flist(s),
        "rho_B": rhoB,
        "rho_B2": rhoB**2,
        "rho_Q": rhoQ,
        "frobenius_interval_rho_Q": [float(s.min()), float(s.max())],
        "collatz_wielandt_rho_Q": [float(cw[0]), float(cw[1])],
        "cyclic_sccs": [[int(x) for x in g] for g in blocks_idx],
        "states_on_cycles": m,
        "su_R": _f(R),
        "su_R_per_state": _flist(r),
        "su_R_avg": _f(R / n),
        "su_dominant_term": _f(dom),
        "su_upper_bound_cyclic": _f(up_c),
        "su_upper_bound_n": _f(up_n),
        "lower_bounds_K": K_lb,
        "su_lower_bound_trace_cs": _f(lb_tr),
        "su_lower_bound_diag_cs": _f(lb_dg),
        "su_estimate_r2": _f(r2),
        "su_estimate_r3": _f(r3),
        "fu_arp": _f(fu),
        "fu_arp_corrected": _f(fu_corr),
        "traces_k": trk,
        "fu_bounds": fb,
        "inflow_1": _flist(in1),
        "outflow_1": _flist(out1),
        "top_inflow_tokens": [int(x) for x in top],
        "greedy": gr,
        "greedy_matrix": greedy_matrix,
        "p_eos": _flist(a),
        "p_nonterminate": _flist(1.0 - a),
        "expected_steps_to_eos": _flist(tau),
        "mc": mcb,
        "occupation": {
            "pi0": _flist(p0),
            "T": T,
            "nu": _flist(nu),
            "lsr": _f(lsr),
            "lsr_trunc_K": K_mc,
            "lsr_trunc": _f(lsr_trunc),
            "greedy_cycle_occupancy": gco,
        },
    }
    out: dict[str, Any] = {"n": n, "eos_index": n, "route": route, "quantities": q}
    if route == "sparse":
        out["partial"] = sorted(set(partial))
        out["notes"] = notes
        out["estimates"] = estimates
    elif notes:  # the dense route's only note: an ill-conditioned termination solve
        out["notes"] = notes
    if eos != N - 1:
        out["state_order"] = [int(x) for x in order[:n]]
    return out


def _trace_S_newton(ch: _Chain, bk: _Block, k: int) -> float:
    """``tr(S_C^k)`` past the block's own certified stop (its B terms are then negligible, but the
    global trace-CS denominator still needs ``tr S_C^k``): more sparse powers on the sparse route,
    the eigenvalues of ``S_C`` (rounded to an integer) on the dense route."""
    if not bk.exact:
        return 0.0
    if getattr(bk, "_sparse", False):
        while len(bk.dS) < k:
            bk._PS = bk.Smat @ bk._PS  # type: ignore[attr-defined]
            bk.dS.append(np.diag(bk._PS).copy())  # type: ignore[attr-defined]
        return float(bk.dS[k - 1].sum())
    if bk.eigS is None:
        Sc = bk.Smat.toarray() if sp.issparse(bk.Smat) else bk.Smat
        bk.eigS = _eigvals(Sc)
    t = float(np.real(np.sum(bk.eigS**k)))
    return float(max(round(t), 0.0)) if abs(t) < 2**52 else t


def _fu_bounds(ch: _Chain, zeta_n: float, rhoB: float, out2, in2, s, partial, notes, rowB=None, colB=None) -> dict:
    """``rowB``/``colB``: ``B·1`` and ``Bᵀ·1`` when the caller has them (sparse route: saves matvecs)."""
    n = ch.n
    cond = bool(zeta_n > rhoB**2 + DIVERGENCE_TOL)
    D = float(np.min(0.5 * (zeta_n - out2) + 0.5 * (zeta_n - in2)))
    out1 = 1.0 - ch.b
    if ch.dense:
        B = ch.Bd
        mu = B.sum(axis=1) / n
        var_sum = float(np.sum((B - mu[:, None]) ** 2))
        B2 = B @ B
        sv = scipy.linalg.svdvals(B2, check_finite=False)
        nuc = float(sv.sum())
        tol = sv.max(initial=0.0) * max(B2.shape) * np.finfo(np.float64).eps
        rank = int(np.sum(sv > tol))
        sig = float(scipy.linalg.svdvals(zeta_n * np.eye(n) - B2, check_finite=False).min())
        exact = True
    else:
        Bo = ch.op("B")
        rowB = ch.B_matvec(np.ones(n)) if rowB is None else rowB
        mu = rowB / n
        frob2 = float((ch.op("Q").matvec(np.ones(n)) if s is None else s).sum())
        var_sum = frob2 - float(n * np.sum(mu**2))
        col = ch.B_rmatvec(np.ones(n)) if colB is None else colB
        rank = int(np.sum(col > 0))  # r <= #non-zero columns of B (upper bound)
        frob = math.sqrt(max(frob2, 0.0))
        norm2 = min(frob, math.sqrt(float(col.max(initial=0.0)) * float(rowB.max(initial=0.0))))
        nuc = math.sqrt(rank) * frob * norm2
        sig = max(D, 0.0)
        exact = False
        keys = ["fu_bounds.nuclear_norm_B2", "fu_bounds.rank_B2", "fu_bounds.sigma_min", "fu_bounds.thm1_bound",
                "fu_bounds.cor11_numerator", "fu_bounds.cor11_bound", "fu_bounds.cor12_bound"]
        partial += keys
        notes["fu_bounds.thm1_bound"] = ("certified relaxation (spec §4.6): nuclear_norm_B2 is the upper bound sqrt(r)·||B||_F·min(||B||_F, sqrt(||B||_1||B||_inf)), "
                                         "rank_B2 the upper bound #non-zero columns, sigma_min the lower bound max(D, 0)")
    num11 = math.sqrt(rank) * (var_sum + float(np.sum(out1**2)))
    if cond and sig > 0:
        thm1 = nuc / sig
        cor11 = num11 / sig
    else:
        thm1 = cor11 = _INF
    cor12 = nuc / D if D > 0 else _INF
    return {
        "zeta_n": zeta_n,
        "rho_B2": rhoB**2,
        "condition_zeta_n_gt_rho_B2": cond,
        "nuclear_norm_B2": nuc,
        "rank_B2": rank,
        "sigma_min": sig,
        "outflow_2": _flist(out2),
        "inflow_2": _flist(in2),
        "cor12_D": D,
        "cor11_numerator": num11,
        "thm1_bound": _f(thm1),
        "cor11_bound": _f(cor11),
        "cor12_bound": _f(cor12),
    }


def policy_case_quantities(A, eos_index: int | None = None) -> dict:
    """The policy-case keys of spec §12: ``mean_p_eos`` (mean of ``p_eos``),
    ``greedy_loop_fraction`` (``greedy.loop_fraction``) and ``row_collision_full``
    (``Σ_j A_ij²`` over all ``n+1`` columns, one value per token row)."""
    eos = validate_transition_matrix(A, eos_index)
    M, _, _ = to_spec_layout(A, eos)
    n = M.shape[0] - 1
    dense = n <= DENSE_MAX_STATES
    ch = _Chain.build(M, None, dense=dense)
    a, _ = _termination(ch)
    f = greedy_next(M.toarray() if (dense and sp.issparse(M)) else M)
    gr = greedy_graph(f, n)
    return {
        "mean_p_eos": float(np.mean(a)),
        "greedy_loop_fraction": gr["loop_fraction"],
        "row_collision_full": _flist(row_collision_full(M)),
    }
