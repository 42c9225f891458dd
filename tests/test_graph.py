"""networkx views on the greedy functional graph and the support (spec §5), GraphML export."""

from __future__ import annotations

import networkx as nx
import numpy as np

from repdiag import graph, theory

from test_theory import CASES, greedy_several_cycles, sparse_random, transitive_closure_sccs  # noqa: F401


def test_greedy_analysis_is_theory_block():
    A, f = greedy_several_cycles()
    g = graph.greedy_analysis(A)
    q = theory.compute_quantities(A, mc_trajectories=2)["quantities"]
    assert g == q["greedy"]


def test_greedy_digraph_cycles_match_colouring():
    A, f = greedy_several_cycles()
    n = A.shape[0] - 1
    G = graph.greedy_digraph(A)
    assert G.number_of_edges() == n and G.number_of_nodes() == n + 1
    cycles = sorted(sorted(c) for c in nx.simple_cycles(G))  # fine: one out-edge per node
    g = theory.greedy_graph(theory.greedy_next(A), n)
    assert cycles == sorted(sorted(c) for c in g["cycles"])
    for i in range(n):
        assert G.nodes[i]["fate"] == g["fate"][i]
        assert G.nodes[i]["on_cycle"] == (g["steps_to_fate"][i] == 0 and g["fate"][i] >= 0)
    assert G.graph["n_cycles"] == 4


def test_support_sccs_networkx_equals_csgraph():
    for name, A in CASES.items():
        assert graph.support_sccs(A) == theory.cyclic_sccs(A), name
        n = A.shape[0] - 1
        assert graph.support_sccs(A) == transitive_closure_sccs(A[:n, :n])


def test_inflow_hubs():
    A = CASES["hub_dense"]
    hubs = graph.inflow_hubs(A, top=2)
    assert hubs[0][0] == 0 and hubs[0][1] == 9


def test_to_graphml_roundtrip(tmp_path):
    A, f = greedy_several_cycles()
    n = A.shape[0] - 1
    labels = [f"tok{i}" for i in range(n)] + ["</s>"]
    out = tmp_path / "sub" / "loops.graphml"
    graph.to_graphml(A, None, out, token_labels=labels)
    G = nx.read_graphml(out)
    assert G.number_of_nodes() == n + 1 and G.number_of_edges() == n
    assert G.nodes["13"]["label"] == "tok13" and G.nodes[str(n)]["label"] == "</s>"
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no temp file left


def test_graph_eos_not_last():
    A, f = greedy_several_cycles()
    n = A.shape[0] - 1
    order = [n] + list(range(n))
    Ap = A[np.ix_(order, order)]
    G = graph.greedy_digraph(Ap, eos_index=0)
    # node ids are spec-layout indices; 'state' is the caller's index
    assert G.nodes[0]["state"] == 1 and G.nodes[n]["state"] == 0
    assert graph.greedy_analysis(Ap, 0) == graph.greedy_analysis(A)
