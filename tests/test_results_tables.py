"""bench/results.py: the tables and the plot of docs/results.md from run folders (synthetic runs here)."""

from __future__ import annotations

import json

from ressformer.bench import results


def _run(root, name, steps, tokens_per_step, tps, vals):
    d = root / name
    d.mkdir()
    recs = [{"step": 0, "val_loss": 5.5, "val_bpb": 7.9}]
    for s in range(1, steps + 1):
        recs.append({"step": s, "loss": 2.0, "ce": 2.0, "struct": 0.1, "tokens": s * tokens_per_step,
                     "tokens_per_s": tps})
        if s in vals:
            recs.append({"step": s, "val_loss": vals[s] * 0.693, "val_bpb": vals[s]})
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")


def test_refresh_table_uses_each_models_speed_alone(tmp_path):
    _run(tmp_path, "baby_baseline_lr3e-3", 20, 768, 1000.0, {10: 3.0, 20: 2.5})
    _run(tmp_path, "speed_baseline", 5, 768, 9000.0, {5: 4.0})
    _run(tmp_path, "res_k2_2000_lr6e-3", 20, 768, 500.0, {20: 2.4})
    _run(tmp_path, "speed_k2", 5, 768, 7000.0, {5: 4.0})
    table = results.refresh_table(tmp_path).splitlines()
    assert len(table) == 4  # header, rule, the two runs with a speed run (the others are absent)
    base = next(r for r in table if r.startswith("| dense baseline, lr 3e-3 |"))
    # 20 x 768 tokens at 9,000 tokens/s alone: 1.7 s, not the 15.4 s of the run's own (shared) speed
    assert "| 20 (15,360) | 2.500 | 9,000 | 0 min 02 s |" in base
    assert "| 2.400 | 7,000 |" in next(r for r in table if "K=2" in r)
    png = results.refresh_plot(tmp_path, tmp_path / "img")
    assert png.is_file() and png.stat().st_size > 1000


def test_mqar_table_keeps_variants_apart(tmp_path):
    def put(name, acc, seq, pairs):
        (tmp_path / f"{name}.json").write_text(json.dumps({"accuracy": acc, "seq_len": seq, "n_pairs": pairs,
                                                           "steps": 2000}))
    put("mqar_r_128_8", 0.99, 128, 8)
    put("mqar_b_128_8", 0.13, 128, 8)
    put("mqar_r_noconv_128_8", 0.06, 128, 8)
    put("mqar_r_256_16", 0.02, 256, 16)
    rows = results.mqar_table(tmp_path).splitlines()[2:]
    assert rows == ["| 128 | 8 | 2000 | 0.990 | 0.130 |", "| 128 | 8 | 2000 | 0.060 (noconv) | – |",
                    "| 256 | 16 | 2000 | 0.020 | – |"]


def test_plots_leave_absent_runs_alone(tmp_path):
    out = tmp_path / "img"
    assert results.plot(tmp_path, out) == []  # no run of any figure in ROOT: nothing written, nothing replaced
