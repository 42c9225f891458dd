"""`repdiag bounds` and `repdiag graph` on matrix files: the JSON layout of spec §12, policies, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from repdiag.cli import main


def leaky_two_cycle(p: float) -> np.ndarray:
    """0 → 1 → 0 with probability p per step, <eos> (index 2, last) with 1 − p (spec §12)."""
    return np.array([[0.0, p, 1 - p], [p, 0.0, 1 - p], [0.0, 0.0, 1.0]])


def bounds_json(capsys, *args: str) -> dict:
    assert main(["bounds", *args, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_layout_and_analytic_values(tmp_path, capsys):
    p = 0.8
    path = tmp_path / "m.npy"
    np.save(path, leaky_two_cycle(p))
    doc = bounds_json(capsys, str(path))
    assert doc["n"] == 2 and doc["eos_index"] == 2
    q = doc["quantities"]
    assert q["su_R"] == pytest.approx(2 * p**4 / (1 - p**4), rel=1e-9)
    assert q["su_R_per_state"] == pytest.approx([p**4 / (1 - p**4)] * 2, rel=1e-9)
    assert q["fu_arp"] == pytest.approx(2 * p**2 / (1 - p**2), rel=1e-9)
    assert q["expected_steps_to_eos"] == pytest.approx([1 / (1 - p)] * 2, rel=1e-9)
    assert q["greedy"]["cycles"] == [[0, 1]]
    for key in ("fu_bounds", "traces_k", "mc", "occupation", "greedy_matrix", "collatz_wielandt_rho_Q"):
        assert key in q
    assert q["fu_bounds"]["thm1_bound"] >= q["fu_arp"]


def test_pure_cycle_is_inf_as_a_string(tmp_path, capsys):
    path = tmp_path / "m.npy"
    np.save(path, leaky_two_cycle(1.0))
    assert main(["bounds", str(path), "--format", "json"]) == 0
    text = capsys.readouterr().out
    q = json.loads(text)["quantities"]
    assert q["su_R"] == "inf" and q["fu_arp"] == "inf"
    assert "NaN" not in text and "Infinity" not in text


def test_one_policy_adds_the_policy_case_keys(tmp_path, capsys):
    path = tmp_path / "m.npy"
    np.save(path, leaky_two_cycle(0.8))
    doc = bounds_json(capsys, str(path), "--policy", "do_sample=false")
    q = doc["quantities"]
    assert q["greedy_loop_fraction"] == 1.0
    assert q["mean_p_eos"] == pytest.approx(0.0)
    assert q["row_collision_full"] == pytest.approx([1.0, 1.0])
    assert q["su_R"] == "inf"


def test_several_policies_nest_under_policies(tmp_path, capsys):
    path = tmp_path / "m.npy"
    np.save(path, leaky_two_cycle(0.8))
    doc = bounds_json(capsys, str(path), "--policy", "greedy", "--policy", "temperature=0.5,do_sample=true,top_k=0")
    assert set(doc["policies"]) == {"greedy", "temperature=0.5,do_sample=true,top_k=0"}
    assert doc["policies"]["greedy"]["quantities"]["su_R"] == "inf"


def test_eos_index_option(tmp_path, capsys):
    A = leaky_two_cycle(0.8)[[2, 0, 1]][:, [2, 0, 1]]  # <eos> first
    path = tmp_path / "m.npy"
    np.save(path, A)
    q = bounds_json(capsys, str(path), "--eos-index", "0")["quantities"]
    assert q["su_R"] == pytest.approx(2 * 0.8**4 / (1 - 0.8**4), rel=1e-9)


@pytest.mark.parametrize("bad, needle", [
    (np.array([[0.5, 0.6], [0.0, 1.0]]), "row 0"),
    (np.array([[np.nan, 1.0], [0.0, 1.0]]), "NaN"),
    (np.array([[1.5, -0.5], [0.0, 1.0]]), "negative"),
    (np.ones((2, 3)) / 3, "square"),
])
def test_bad_matrices_exit_2_with_one_line(tmp_path, capsys, bad, needle):
    path = tmp_path / "bad.npy"
    np.save(path, bad)
    assert main(["bounds", str(path)]) == 2
    err = capsys.readouterr().err
    assert needle.lower() in err.lower()
    assert len(err.strip().splitlines()) == 1


def test_eos_index_out_of_range_and_unknown_policy(tmp_path, capsys):
    path = tmp_path / "m.npy"
    np.save(path, leaky_two_cycle(0.5))
    assert main(["bounds", str(path), "--eos-index", "7"]) == 2
    assert "7" in capsys.readouterr().err
    assert main(["bounds", str(path), "--policy", "warp_speed"]) == 2
    assert "greedy" in capsys.readouterr().err  # lists the valid names


def test_graph_writes_graphml(tmp_path):
    path = tmp_path / "m.npy"
    np.save(path, leaky_two_cycle(0.8))
    out = tmp_path / "loops.graphml"
    assert main(["graph", str(path), "-o", str(out)]) == 0
    import networkx as nx

    g = nx.read_graphml(out)
    assert g.number_of_nodes() >= 2
