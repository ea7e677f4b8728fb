"""Issue 23: the long-range recall task, test-time top_k exports, the annealed MQAR selection and
the accuracy-latency bench (through the exported graphs in ONNX Runtime)."""

import json

import numpy as np
import pytest

from ressformer.recall import IGNORE, KEY_LO, QUERY, STORE, VALUE_LO, recall_batch


@pytest.mark.parametrize("n_pairs", [1, 3])
def test_recall_batch_places_the_queried_record_at_its_distance(n_pairs):
    L, T = 16, 9 * 16
    x, y, d = recall_batch(64, T, L, (0, 8), seed=7, n_pairs=n_pairs)
    assert x.shape == y.shape == (64, T) and x.dtype == np.int64 and set(d) <= set(range(9))
    assert len(set(d)) > 4  # distances are drawn, not fixed
    for i in range(64):
        assert x[i, -2] == QUERY and KEY_LO <= x[i, -1] < VALUE_LO
        stores = np.flatnonzero(x[i] == STORE)
        assert len(stores) == n_pairs and len(set(stores // L)) == n_pairs  # one record per segment
        keys = x[i, stores + 1]
        assert len(set(keys)) == n_pairs  # distinct keys
        (j,) = np.flatnonzero(keys == x[i, -1])
        at = stores[j]
        assert (T - 1) // L - at // L == d[i]  # segment ends between the record and the answer
        assert at // L == (at + 2) // L and at + 2 < T - 2  # inside one segment, before the query
        assert y[i, -1] == x[i, at + 2] >= VALUE_LO  # the label is the queried record's value
        assert (y[i, :-1] == IGNORE).all()
        rest = np.delete(x[i], np.r_[[s + o for s in stores for o in range(3)], T - 2, T - 1])
        assert ((rest >= 3) & (rest < KEY_LO)).all()  # filler never looks like a key, value or marker
    x2, _, _ = recall_batch(64, T, L, (0, 8), seed=7, n_pairs=n_pairs)
    assert (x == x2).all()  # deterministic in its seed


@pytest.mark.parametrize("kw, msg", [
    (dict(seq_len=64, segment_len=16, distance=4), "needs a sequence of more than 4 segments"),
    (dict(seq_len=64, segment_len=16, distance=(3, 1)), "distance must be >= 0"),
    (dict(seq_len=64, segment_len=16, distance=1, n_pairs=5), "n_pairs must be in"),
    (dict(seq_len=64, segment_len=3, distance=0), "segment_len must be >= 4"),
    (dict(seq_len=65, segment_len=16, distance=0), "no room for a record"),
])
def test_recall_batch_refuses_impossible_layouts(kw, msg):
    with pytest.raises(ValueError, match=msg):
        recall_batch(2, **kw)


def test_topk_schedule_anneals_to_the_config_top_k():
    from ressformer.config import ReSSFormerConfig
    from ressformer.mqar import _topk_schedule

    cfg = ReSSFormerConfig.preset("tiny", segment_len=256)
    k = _topk_schedule(cfg, 256, 1000, 0, 0.5)
    ks = [k(s) for s in range(1001)]
    assert ks[0] == 4 + 8 + 256  # all candidates: memory, cache, sequence
    assert all(a >= b for a, b in zip(ks, ks[1:]))  # never widens
    assert ks[500] == ks[1000] == 8 and ks[450] > 8 and ks[250] > 40
    assert _topk_schedule(cfg, 256, 1000, None, 0.5)(0) == 8  # no annealing: the config's top_k
    with pytest.raises(ValueError, match="must be >= the final top_k"):
        _topk_schedule(cfg, 256, 1000, 4, 0.5)


def test_annealed_mqar_trains_and_reports_its_curve():
    from ressformer.mqar import train_mqar

    res = train_mqar("tiny", {"segment_len": 64}, seq_len=64, n_pairs=4, steps=6, batch_size=4, warmup=1,
                     eval_examples=8, top_k_start=0, anneal_frac=0.5, eval_every=2, log=lambda *a: None)
    assert [c["step"] for c in res["curve"]] == [2, 4, 6]
    assert res["curve"][0]["top_k"] > 8 and res["curve"][-1]["top_k"] == res["top_k"] == 8
    assert all(0 <= c["accuracy"] <= 1 for c in res["curve"])


@pytest.fixture(scope="module")
def recall_checkpoint(tmp_path_factory):
    from ressformer.recall import train_recall

    out = tmp_path_factory.mktemp("recall") / "ck"
    res = train_recall("tiny", {"segment_len": 16}, max_distance=2, steps=4, batch_size=4, warmup=1,
                       eval_examples=8, out=out, log=lambda *a: None)
    assert set(res["accuracy"]) == {"0", "1", "2"} and res["seq_len"] == 48
    meta = json.loads((out / "config.json").read_text())
    assert meta["task"] == "recall" and meta["recall"]["max_distance"] == 2
    return out


def test_export_at_another_top_k_matches_pytorch_at_that_top_k(recall_checkpoint, tmp_path):
    """The weights do not depend on top_k: an export with top_k 3 holds the same weights, says so in
    its sidecar, and its graphs equal PyTorch run with top_k 3 (the parity ladder), not the trained 8."""
    from ressformer.export.exporter import export_checkpoint
    from ressformer.parity.ladder import validate_export
    from ressformer.runtime import ReSSFormerSession

    from ressformer.checkpoint import load_checkpoint

    ex = export_checkpoint(recall_checkpoint, tmp_path / "k3", top_k=3, validate=validate_export,
                           progress=lambda s: None)
    meta = json.loads((ex / "ressformer.json").read_text())
    assert meta["config"]["top_k"] == 3 and meta["trained_top_k"] == 8
    assert json.loads((ex / "validation.json").read_text())["passed"]
    x, _, _ = recall_batch(4, 48, 16, (0, 2), seed=3)
    lg, _ = ReSSFormerSession(ex).forward(x)
    import torch

    model = load_checkpoint(recall_checkpoint)
    with torch.no_grad():
        ref8 = model(torch.from_numpy(x)).logits.numpy()
        model.config.top_k = 3
        ref3 = model(torch.from_numpy(x)).logits.numpy()
    np.testing.assert_allclose(lg, ref3, rtol=1e-4, atol=1e-4)
    assert np.abs(lg - ref8).max() > 1e-3  # the selection changed the numbers
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        export_checkpoint(recall_checkpoint, tmp_path / "k0", top_k=0, progress=lambda s: None)
    assert not (tmp_path / "k0").exists()


def test_tradeoff_bench_measures_every_setting_in_onnx_runtime(recall_checkpoint, tmp_path):
    from ressformer.bench.recall import plot, run_tradeoff
    from ressformer.runtime import ReSSFormerSession

    from ressformer.checkpoint import load_checkpoint

    rep = run_tradeoff(recall_checkpoint, tmp_path / "tr", distances=(0, 1, 3), top_ks=(4,), steps_list=(1,),
                       context=64, examples=8, decode_tokens=3, validate=False, progress=lambda s: None)
    assert {(g["K"], g["top_k"]) for g in rep["grid"]} == {(1, 4), (2, 4), (1, 8), (2, 8)}  # + trained K, k
    assert [g["trained"] for g in rep["grid"] if g["trained"]] == [True]
    assert all(0 <= g["accuracy"] <= 1 and g["ms_per_token"] > 0 for g in rep["grid"])
    assert [r["distance"] for r in rep["distance"]] == [0, 1, 3] and rep["distance"][-1]["tokens"] == 64
    assert "| K | top_k | accuracy | ms per token |" in rep["table"]
    assert json.loads((tmp_path / "tr" / "tradeoff.json").read_text())["grid"] == rep["grid"]
    plot(rep, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 10_000
    # the accuracy the bench reports is the PyTorch model's on the same sequences
    from ressformer.bench.recall import accuracy

    sess = ReSSFormerSession(tmp_path / "tr" / "top8")
    import torch

    x, y, _ = recall_batch(8, 64, 16, (0, 2), seed=[1, 2, 64])
    with torch.no_grad():
        ref = load_checkpoint(recall_checkpoint)(torch.from_numpy(x)).logits[:, -1].argmax(-1).numpy()
    assert accuracy(sess, 64, (0, 2), 8) == float((ref == y[:, -1]).mean())


def test_mqar_curriculum_starts_on_the_shorter_task(monkeypatch):
    """The first `steps` batches are of the curriculum's task; the held-out set is the asked one."""
    import ressformer.mqar as mq

    seen = []
    real = mq.mqar_batch

    def spy(n, seq_len=64, n_pairs=4, *args, **kw):
        seen.append((n, seq_len, n_pairs))
        return real(n, seq_len, n_pairs, *args, **kw)

    monkeypatch.setattr(mq, "mqar_batch", spy)
    mq.train_mqar("tiny", {"segment_len": 64}, seq_len=64, n_pairs=4, steps=5, batch_size=2, warmup=1,
                  eval_examples=4, curriculum=(32, 2, 3), log=lambda *a: None)
    train = [s for s in seen if s[0] == 2]
    assert [s[1:] for s in train] == [(32, 2)] * 3 + [(64, 4)] * 2
    assert (4, 64, 4) in seen  # held out: the asked task
    with pytest.raises(ValueError, match="no larger than the asked one"):
        mq.train_mqar("tiny", seq_len=64, n_pairs=4, steps=5, curriculum=(128, 2, 3), log=lambda *a: None)


@pytest.mark.parametrize("args, msg", [
    (["bench", "--tradeoff", "--preset", "tiny"], "--tradeoff needs a CHECKPOINT"),
    (["bench", "--tradeoff", "--baseline", "--preset", "tiny"], "different benchmarks"),
    (["recall", "--baseline", "--out", "X"], "the --baseline model is PyTorch-only"),
    (["mqar", "--curriculum", "128,8"], "three integers"),
    (["export", ".", "--out", "o", "--top-k", "0"], "--top-k"),
])
def test_cli_refuses_bad_issue23_options(args, msg, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from ressformer.cli import main

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and msg in r.output, r.output


def test_recall_cli_trains_and_saves_a_checkpoint_to_export(tmp_path):
    from click.testing import CliRunner

    from ressformer.checkpoint import load_checkpoint
    from ressformer.cli import main

    r = CliRunner().invoke(main, ["-q", "recall", "--max-distance", "1", "--steps", "2", "--batch-size", "2",
                                  "--eval-examples", "2", "--set", "segment_len=8", "--out", str(tmp_path / "ck"),
                                  "--json-out", str(tmp_path / "r.json"), "--threads", "1"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "r.json").read_text())
    assert set(res["accuracy"]) == {"0", "1"} and len(res["curve"]) == 1
    assert load_checkpoint(tmp_path / "ck").config.segment_len == 8


def test_random_depth_trains_each_batch_at_a_drawn_k(monkeypatch):
    """--random-depth: the training batches run at K drawn from the range (the held-out set at n_steps)."""
    from ressformer.model import ReSSFormer
    from ressformer.recall import train_recall

    seen = []
    real = ReSSFormer.forward

    def spy(self, tokens, state=None, steps=None):
        seen.append((self.training, steps))
        return real(self, tokens, state, steps)

    monkeypatch.setattr(ReSSFormer, "forward", spy)
    res = train_recall("tiny", {"segment_len": 8, "n_steps": 3}, max_distance=1, steps=12, batch_size=2,
                       warmup=1, eval_examples=2, depths=(1, 3), log=lambda *a: None)
    train = [k for t, k in seen if t]
    assert len(train) == 12 and set(train) == {1, 2, 3}
    assert {k for t, k in seen if not t} == {None}  # held out: the config's K
    assert res["depths"] == [1, 3]
    with pytest.raises(ValueError, match="depths must be"):
        train_recall("tiny", depths=(2, 1), log=lambda *a: None)
