"""networkx views of a transition matrix (spec §1, §5): the greedy functional graph, its cycles,
basins, fates and in-degree hubs, the SCCs of the support, and a GraphML export.

The greedy analysis itself is :func:`repdiag.theory.greedy_graph` (the one O(n) three-colour
pass); this module only builds networkx objects on top of it. Never ``simple_cycles`` on the full
sampling graph (exponentially many cycles): only on the greedy graph, which has one out-edge per
state. No torch here.
"""

from __future__ import annotations

import os
from typing import Sequence

import networkx as nx
import numpy as np
import scipy.sparse as sp

from . import theory
from ._atomic import atomic_path

__all__ = ["greedy_analysis", "greedy_digraph", "support_digraph", "support_sccs", "inflow_hubs", "to_graphml"]


def _layout(A, eos_index):
    eos = theory.validate_transition_matrix(A, eos_index)
    M, _, order = theory.to_spec_layout(A, eos)
    return M, order


def greedy_analysis(A, eos_index: int | None = None) -> dict:
    """The ``greedy`` block of spec §12 for ``A`` (``<eos>`` permuted last if needed)."""
    M, _ = _layout(A, eos_index)
    n = M.shape[0] - 1
    return theory.greedy_graph(theory.greedy_next(M), n)


def greedy_digraph(A, eos_index: int | None = None, token_labels: Sequence[str] | None = None) -> nx.DiGraph:
    """``nx.DiGraph`` with the ``n`` edges ``i → f(i)`` plus an ``<eos>`` node (id ``n`` in spec layout).

    Node attributes: ``label``, ``state`` (index in the caller's order), ``fate``, ``on_cycle``,
    ``steps_to_fate``, ``indegree``; edge attribute ``prob`` (``A_i,f(i)``). Graph attributes:
    ``n_cycles``, ``loop_fraction``.
    """
    M, order = _layout(A, eos_index)
    n = M.shape[0] - 1
    f = theory.greedy_next(M)
    g = theory.greedy_graph(f, n)
    on_cycle = np.zeros(n, bool)
    for cyc in g["cycles"]:
        on_cycle[cyc] = True
    G = nx.DiGraph(n_cycles=len(g["cycles"]), loop_fraction=float(g["loop_fraction"]))
    for i in range(n):
        orig = int(order[i])
        label = str(token_labels[orig]) if token_labels is not None else str(orig)
        G.add_node(i, label=label, state=orig, fate=int(g["fate"][i]), on_cycle=bool(on_cycle[i]),
                   steps_to_fate=int(g["steps_to_fate"][i]), indegree=int(g["indegree"][i]))
    eos_orig = int(order[n])
    G.add_node(n, label=str(token_labels[eos_orig]) if token_labels is not None else "<eos>", state=eos_orig,
               fate=-1, on_cycle=False, steps_to_fate=0, indegree=int(g["indegree_eos"]))
    rows = M.tocsr() if sp.issparse(M) else None
    for i in range(n):
        j = int(f[i])
        p = float(rows[i, j]) if rows is not None else float(M[i, j])
        G.add_edge(i, j, prob=p)
    return G


def support_digraph(A, eos_index: int | None = None) -> nx.DiGraph:
    """The support graph ``S = 1[B > 0]`` over the ``n`` non-eos states (spec layout) as networkx."""
    M, _ = _layout(A, eos_index)
    n = M.shape[0] - 1
    B = sp.csr_matrix(M)[:n, :n]
    B.eliminate_zeros()
    G = nx.DiGraph()
    G.add_nodes_from(range(n))
    coo = B.tocoo()
    G.add_weighted_edges_from(zip(coo.row.tolist(), coo.col.tolist(), coo.data.tolist()), weight="prob")
    return G


def support_sccs(A, eos_index: int | None = None) -> list[list[int]]:
    """Cyclic SCCs of the support by networkx (Tarjan) — a second route to ``cyclic_sccs``."""
    G = support_digraph(A, eos_index)
    out = []
    for comp in nx.strongly_connected_components(G):
        comp = sorted(comp)
        if len(comp) >= 2 or G.has_edge(comp[0], comp[0]):
            out.append(comp)
    out.sort()
    return out


def inflow_hubs(A, eos_index: int | None = None, top: int = 5) -> list[tuple[int, int, float]]:
    """Greedy in-degree hubs: ``(token, greedy in-degree, one-step inflow)`` largest first."""
    M, _ = _layout(A, eos_index)
    n = M.shape[0] - 1
    g = theory.greedy_graph(theory.greedy_next(M), n)
    indeg = np.asarray(g["indegree"])
    inflow = np.asarray(sp.csr_matrix(M)[:n, :n].sum(axis=0)).ravel()
    order = np.lexsort((np.arange(n), -inflow, -indeg))[: min(top, n)]
    return [(int(i), int(indeg[i]), float(inflow[i])) for i in order]


def to_graphml(A, eos_index: int | None, path: str | os.PathLike[str], token_labels: Sequence[str] | None = None) -> str:
    """Write the greedy functional graph (cycles, basins, fates, hubs) as GraphML, atomically."""
    G = greedy_digraph(A, eos_index, token_labels)
    with atomic_path(path, suffix=".graphml") as tmp:
        nx.write_graphml(G, str(tmp))
    return str(path)
