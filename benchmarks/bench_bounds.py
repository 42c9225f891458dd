"""Benchmark of the theory engine (issue 5, spec §13).

1. All bounds on a 250,000-state matrix with 50 stored entries per row (12.5 M non-zeros, random,
   with a planted leaky 3-cycle and a self-loop trap): target <= 10 s and <= 2 GiB peak RSS.
2. n = 2,000 sparse matrix: the sparse route agrees with the dense route to 1e-6 on every exact key,
   with the time ratio printed side by side.

Run: .venv/bin/python benchmarks/bench_bounds.py [--n 250000] [--k 50] [--skip-large] [--skip-compare]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from repdiag.theory import compute_quantities  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def planted_matrix(n: int, k: int, seed: int = 0) -> sp.csr_matrix:
    """(n+1)x(n+1) CSR, <eos> last, k stored successors per row plus the <eos> column.

    Rows 0-2: a leaky 3-cycle 0 -> 1 -> 2 -> 0 (p = 0.9 per edge, <eos> 0.1); row 3: a self-loop
    trap (no <eos>); every other row: k random successors among the states 4..n-1 with squared
    uniform weights and an <eos> probability in [0.01, 0.1]; rows 10 and 11 send 5 % of their mass
    into the 3-cycle and the trap.
    """
    rng = np.random.default_rng(seed)
    N = n + 1
    cols = np.sort(rng.integers(4, n, size=(n, k), dtype=np.int64), axis=1)
    w = rng.random((n, k)) ** 2
    w[:, 1:][cols[:, 1:] == cols[:, :-1]] = 0.0  # duplicate successor: drop
    eos = rng.uniform(0.01, 0.1, size=n)
    w *= ((1 - eos) / w.sum(axis=1))[:, None]
    p = 0.9
    for i, j in ((0, 1), (1, 2), (2, 0)):
        cols[i] = np.arange(k)
        cols[i, :] = np.arange(4, 4 + k)
        w[i] = 0.0
        cols[i, 0] = j
        w[i, 0] = p
        eos[i] = 1 - p
    cols[3] = np.arange(3, 3 + k)
    w[3] = 0.0
    w[3, 0] = 1.0
    eos[3] = 0.0
    for i, j in ((10, 0), (11, 3)):
        w[i] *= 0.95
        cols[i, 0] = j
        w[i, 0] = 0.05 * (1 - eos[i]) + w[i, 0] * 0  # replaces the smallest-id successor
        w[i] *= (1 - eos[i]) / w[i].sum()
    indices = np.concatenate([cols, np.full((n, 1), n)], axis=1).ravel()
    data = np.concatenate([w, eos[:, None]], axis=1).ravel()
    indptr = np.arange(0, n * (k + 1) + 1, k + 1, dtype=np.int64)
    indices = np.append(indices, n)
    data = np.append(data, 1.0)
    indptr = np.append(indptr, indptr[-1] + 1)
    A = sp.csr_matrix((data, indices.astype(np.int32), indptr), shape=(N, N))
    A.eliminate_zeros()
    return A


def run_large(n: int, k: int) -> None:
    t0 = time.perf_counter()
    A = planted_matrix(n, k)
    t_build = time.perf_counter() - t0
    print(f"[large] built {n:,} states x {k} stored entries/row: nnz = {A.nnz:,} in {t_build:.1f} s; RSS so far {peak_rss_gib():.2f} GiB")
    t0, c0 = time.perf_counter(), time.process_time()
    out = compute_quantities(A, route="auto")
    t, c = time.perf_counter() - t0, time.process_time() - c0
    q = out["quantities"]
    print(f"[large] route={out['route']}  all bounds in {t:.2f} s wall, {c:.2f} s CPU (target <= 10 s); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"[large] peak RSS {peak_rss_gib():.2f} GiB (target <= 2 GiB; includes building the matrix)")
    print(f"[large] zeta_n={q['zeta_n']:.3f} rho_Q={q['rho_Q']:.6g} rho_B={q['rho_B']:.6g} cyclic SCC sizes="
          f"{sorted(len(c) for c in q['cyclic_sccs'])[-3:]} m={q['states_on_cycles']}")
    print(f"[large] su_R={q['su_R']} fu_arp={q['fu_arp']:.6g} fu_arp_corrected={q['fu_arp_corrected']:.6g} "
          f"r2={q['su_estimate_r2']:.6g} greedy cycles={q['greedy']['cycles'][:3]} loop_fraction={q['greedy']['loop_fraction']:.4f}")
    print(f"[large] partial keys: {', '.join(out.get('partial', []))}")


def run_compare(n: int = 2000, k: int = 10) -> None:
    rng = np.random.default_rng(1)
    A = np.zeros((n + 1, n + 1))
    for i in range(n):
        cols = rng.choice(n, k, replace=False)
        w = rng.random(k + 1)
        w[-1] *= 0.2
        w /= w.sum()
        A[i, cols] = w[:k]
        A[i, n] = w[k]
    A[n, n] = 1.0
    S = sp.csr_matrix(A)
    t0, c0 = time.perf_counter(), time.process_time()
    d = compute_quantities(A, route="dense")
    td, cd = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    s = compute_quantities(S, route="sparse")
    ts, cs = time.perf_counter() - t0, time.process_time() - c0
    skip = set(s.get("partial", [])) | {"mc.su_R_trunc_mc", "mc.su_R_trunc_se", "mc.fu_arp_trunc_mc", "mc.fu_arp_trunc_se"}
    worst = [0.0, ""]

    def cmp(a, b, path):
        if path in skip:
            return
        if isinstance(a, dict):
            for key in a:
                cmp(a[key], b[key], f"{path}.{key}".lstrip("."))
        elif isinstance(a, list):
            for x, y in zip(a, b):
                cmp(x, y, path)
        elif isinstance(a, bool) or isinstance(a, int):
            if a != b:
                worst[:] = [math.inf, path]
        else:
            if a == b:
                return
            rel = abs(a - b) / max(1.0, abs(a), abs(b))
            if rel > worst[0]:
                worst[:] = [rel, path]

    cmp(d["quantities"], s["quantities"], "")
    print(f"[compare n={n}, {k}/row] dense {td:.2f} s wall ({cd:.2f} s CPU) | sparse {ts:.2f} s wall ({cs:.2f} s CPU) | "
          f"ratio dense/sparse = {td / ts:.1f}x wall, {cd / cs:.1f}x CPU")
    print(f"[compare] max relative difference over the exact keys = {worst[0]:.2e} (at {worst[1] or '-'}; target <= 1e-6)")
    print(f"[compare] su_R dense {d['quantities']['su_R']:.12g} sparse {s['quantities']['su_R']:.12g}; "
          f"fu_arp dense {d['quantities']['fu_arp']:.12g} sparse {s['quantities']['fu_arp']:.12g}")
    print(f"[compare] sparse-only relaxed keys: {', '.join(sorted(set(s.get('partial', []))))}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=250_000)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--skip-compare", action="store_true")
    args = ap.parse_args()
    if not args.skip_large:
        run_large(args.n, args.k)
    if not args.skip_compare:
        run_compare()


if __name__ == "__main__":
    main()
