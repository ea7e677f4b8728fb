"""bench/ort_kernels.py: per-kernel costs of the attention's small operators in stock ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ressformer.bench import ort_kernels as ok


def test_measure_checks_and_times_every_kernel():
    rep = ok.measure(heads=2, head_dim=4, keys=9, top_k=32, piece=3, threads=1, calls=3, rounds=1)
    assert rep["shapes"] == {"heads": 2, "head_dim": 4, "keys": 9, "top_k": 9, "piece": 3}  # k <= keys
    names = set(rep["us"])
    assert {"empty run", "q·Kᵀ (FusedMatMul)", "w·V (MatMul)"} <= names
    assert {"TopK decode (2 rows), unordered", "TopK piece (6 rows), sorted"} <= names
    assert all(us > 0 for us in rep["us"].values())
    assert set(rep["topk_ns_per_score"]) == {"decode, unordered", "decode, sorted", "piece, unordered", "piece, sorted"}
    report = ok.format_report(rep)
    assert "9 keys, top 9" in report and "TopK, ns per score" in report


def test_a_wrong_kernel_result_fails(monkeypatch):
    """Outputs are checked against numpy before they are timed: a kernel giving other values stops the bench."""
    real = ok._session

    def skewed(node, inputs, threads, inits=()):
        sess = real(node, inputs, threads, inits)
        if node.op_type != "MatMul":
            return sess

        class Off:
            def run(self, out, feeds):
                return [r + np.float32(1e-2) for r in sess.run(out, feeds)]
        return Off()

    monkeypatch.setattr(ok, "_session", skewed)
    with pytest.raises(AssertionError, match="w·V"):
        ok.measure(heads=2, head_dim=4, keys=9, top_k=4, piece=3, threads=1, calls=2, rounds=1)


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "k.json"
    rep = ok.main(["--preset", "tiny", "--keys", "17", "--piece", "4", "--threads", "1", "--calls", "3",
                   "--rounds", "1", "--json", str(out)])
    assert json.loads(out.read_text())["shapes"] == rep["shapes"] and rep["preset"] == "tiny"
    assert "empty run" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        ok.main(["--keys", "0"])
