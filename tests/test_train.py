"""Training, data, checkpoint/resume and MQAR tests (CPU, tiny preset, seconds each)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ressformer import data as D
from ressformer.cli import main
from ressformer.config import ReSSFormerConfig
from ressformer.mqar import IGNORE, mqar_batch, train_mqar
from ressformer.train import TrainConfig, baseline_config, count_params, lr_at, read_metrics, train

QUIET = dict(log=lambda *a, **k: None)
FAST = dict(preset="tiny", batch_size=4, eval_batches=1, eval_every=0, warmup=2, threads=1)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    """60 kB of the default corpus: the real text, quicker to load than all 5 MB."""
    path = tmp_path_factory.mktemp("data") / "shakespeare.txt"
    path.write_text(D.default_corpus()[:60_000], encoding="utf-8")
    return str(path)


def train_losses(out) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


# ---- training ------------------------------------------------------------------------------------
def test_tiny_training_on_default_corpus_lowers_validation_loss(tmp_path):
    res = train(TrainConfig(steps=30, batch_size=8, eval_every=30, eval_batches=2, warmup=5, lr=1e-2,
                            threads=1, out=str(tmp_path)), **QUIET)
    val = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 30]
    assert val[0]["val_loss"] == pytest.approx(math.log(256), abs=0.3)  # untrained: ~uniform bytes
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 1.0
    assert val[-1]["val_bpb"] == pytest.approx(val[-1]["val_loss"] / math.log(2))
    steps = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    for r in steps:  # the logged total is CE + the weighted aux terms
        assert r["loss"] == pytest.approx(r["ce"] + 0.01 * r["balance"] + 0.01 * r["struct"], rel=1e-5)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert res["step"] == 30 and res["val"]["val_loss"] == val[-1]["val_loss"]
    from ressformer.checkpoint import load_checkpoint

    model = load_checkpoint(tmp_path / "ckpt")
    assert model.config == ReSSFormerConfig.preset("tiny")


def test_resume_continues_exactly(tmp_path, corpus_file):
    common = dict(FAST, data=corpus_file, steps=8, grad_accum=2, ckpt_every=3)
    train(TrainConfig(**common, out=str(tmp_path / "full")), **QUIET)
    train(TrainConfig(**common, out=str(tmp_path / "split"), stop_at=4), **QUIET)
    ckpt = json.loads((tmp_path / "split" / "ckpt" / "config.json").read_text())
    assert ckpt["train"]["step"] == 4
    train(TrainConfig(**common, out=str(tmp_path / "split"), resume=str(tmp_path / "split")), **QUIET)

    full, split = train_losses(tmp_path / "full"), train_losses(tmp_path / "split")
    assert [s for s, _ in split] == list(range(1, 9))
    assert split == full  # bitwise: same batches, weights, optimizer state and schedule
    for name in ("model.safetensors", "train_state.safetensors"):
        a, b = (load_file(str(tmp_path / run / "ckpt" / name)) for run in ("full", "split"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    state = load_file(str(tmp_path / "full" / "ckpt" / "train_state.safetensors"))
    assert "optim.embed.weight.exp_avg_sq" in state and state["rng.torch"].dtype == torch.uint8


def test_max_minutes_stops_cleanly_and_resumes(tmp_path, corpus_file):
    run = tmp_path / "run"
    res = train(TrainConfig(**FAST, data=corpus_file, steps=50, max_minutes=1e-6, out=str(run)), **QUIET)
    assert res["step"] == 1  # the deadline passed during the first step: stop after it
    recs = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in recs if "val_loss" in r] == [0, 1]  # evaluated at the stop
    assert json.loads((run / "ckpt" / "config.json").read_text())["train"]["step"] == 1
    res = train(TrainConfig(**FAST, data=corpus_file, steps=50, stop_at=3, resume=str(run), out=str(run)), **QUIET)
    assert res["step"] == 3


def test_evaluate_checkpoint_matches_training_validation(tmp_path, corpus_file):
    from ressformer.train import evaluate_checkpoint

    run = tmp_path / "run"
    train(TrainConfig(**{**FAST, "eval_batches": 3}, data=corpus_file, steps=6, out=str(run)), **QUIET)
    val = [r["val_loss"] for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r][-1]
    same = evaluate_checkpoint(run, windows=3 * FAST["batch_size"])  # the training's windows
    assert same["val_loss"] == pytest.approx(val, rel=1e-6) and same["data"] == corpus_file
    whole = evaluate_checkpoint(run)  # every non-overlapping window of the validation split
    shuffled = evaluate_checkpoint(run, shuffle_paragraphs=True)
    assert whole["bytes"] == whole["windows"] * 64 and abs(shuffled["bytes"] - whole["bytes"]) <= 64
    assert shuffled["val_loss"] != whole["val_loss"]
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["evaluate", str(run), "--windows", "2", "--json-out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["windows"] == 2


def test_evaluate_refuses_windows_beyond_learned_positions(tmp_path, corpus_file):
    run = tmp_path / "run"
    train(TrainConfig(**FAST, data=corpus_file, steps=2, baseline=True, out=str(run)), **QUIET)
    result = CliRunner().invoke(main, ["evaluate", str(run), "--seq-len", "4096"])
    assert result.exit_code == 2 and "learned positions" in result.output


def test_torchrun_two_processes_match_one_process_with_twice_the_batch(tmp_path, corpus_file):
    """DDP on CPU (gloo): 2 processes x batch 4 see the same windows as 1 process x batch 8, and the
    all-reduced gradient is the same mean, so the runs agree (balance loss off: it is not additive)."""
    import os
    import subprocess
    import sys

    args = ["train", corpus_file, "--steps", "3", "--warmup", "1", "--eval-every", "0",
            "--set", "lambda_bal=0", "--threads", "1"]  # + the same 16 validation windows in both
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "ressformer.cli", *args, "--batch-size", "4", "--eval-batches", "4",
                          "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout
    one = CliRunner().invoke(main, [*args, "--batch-size", "8", "--eval-batches", "2", "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    val = [[r["val_loss"] for r in read_metrics(tmp_path / run / "metrics.jsonl") if "val_loss" in r]
           for run in ("one", "two")]
    assert len(val[0]) == len(val[1]) == 2
    np.testing.assert_allclose(val[1], val[0], rtol=1e-4)
    ck = json.loads((tmp_path / "two" / "ckpt" / "config.json").read_text())
    assert ck["train"]["world_size"] == 2 and ck["train"]["step"] == 3


def test_resume_refuses_other_config(tmp_path, corpus_file):
    run = tmp_path / "run"
    train(TrainConfig(**FAST, data=corpus_file, steps=4, stop_at=2, out=str(run)), **QUIET)
    with pytest.raises(ValueError, match="another config.*top_k"):
        train(TrainConfig(**FAST, data=corpus_file, steps=4, overrides={"top_k": 4}, resume=str(run),
                          out=str(run)), **QUIET)
    with pytest.raises(ValueError, match="batch_size"):
        train(TrainConfig(**{**FAST, "batch_size": 8}, data=corpus_file, steps=4, resume=str(run),
                          out=str(run)), **QUIET)
    result = CliRunner().invoke(main, ["train", corpus_file, "--steps", "4", "--batch-size", "4",
                                       "--baseline", "--resume", str(run)])
    assert result.exit_code == 2 and "another config" in result.output
    result = CliRunner().invoke(main, ["train", "--resume", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "does not exist" in result.output


# ---- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"  \n\n ", "is empty"),
    (bytes(range(256)) * 40, "looks binary"),
    ("caf\u00e9 ".encode() * 10 + b"\xff\xfe" * 100, "looks binary"),
    (b"to be or not to be\n" * 5, "too small for one sequence"),
])
def test_bad_data_gives_clear_cli_error(tmp_path, content, message):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    result = CliRunner().invoke(main, ["train", str(path), "--steps", "2", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o" / "ckpt").exists()


def test_bad_settings_give_clear_cli_errors(tmp_path):
    run = lambda *args: CliRunner().invoke(main, ["train", *args, "--out", str(tmp_path)])  # noqa: E731
    r = run("--preset", "huge")
    assert r.exit_code == 2 and "unknown preset 'huge'" in r.output
    r = run("--set", "no_such_field=1")
    assert r.exit_code == 2 and "no_such_field" in r.output
    r = run(str(tmp_path / "missing.txt"))
    assert r.exit_code == 2 and "does not exist" in r.output
    r = run("--steps", "0")
    assert r.exit_code == 2 and "steps must be >= 1" in r.output


def test_load_text_folder(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_text("second")
    (tmp_path / "a.md").write_text("first")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01" * 50)
    (tmp_path / ".hidden").write_text("hidden")
    assert D.load_text(tmp_path) == "first\nsecond"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(D.DataError, match="no non-empty text files"):
        D.load_text(empty)


# ---- data ----------------------------------------------------------------------------------------
def test_tokenizer_roundtrip():
    text = "O Romeo, Romeo! — wherefore art thou ✓"
    ids = D.encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode())
    assert D.decode(ids) == text
    assert D.decode([104, 105, 0xFF]) == "hi\ufffd"


def test_split_and_sampler_are_deterministic():
    text = "abcdefghij" * 400
    train_d, val_d = D.split(text, seq_len=16)
    assert train_d.dtype == np.uint8 and val_d.size == 200 and train_d.size == 3800
    assert bytes(np.concatenate([train_d, val_d])) == text.encode()
    s = D.BatchSampler(train_d, batch_size=3, seq_len=16, seed=7)
    x5, y5 = s.batch(5)
    s.batch(1)
    assert np.array_equal(s.batch(5)[0], x5)  # a function of (seed, step) only
    assert not np.array_equal(s.batch(6)[0], x5)
    assert np.array_equal(x5[:, 1:], y5[:, :-1]) and x5.shape == (3, 16) and x5.dtype == np.int64
    # the ranks of a 2-process run split the global batch of a 1-process run of twice the batch
    whole = D.BatchSampler(train_d, batch_size=6, seq_len=16, seed=7).batch(5)[0]
    ranks = [D.BatchSampler(train_d, 3, 16, seed=7, rank=r, world_size=2).batch(5)[0] for r in (0, 1)]
    assert np.array_equal(np.concatenate(ranks), whole)


def test_shuffle_paragraphs_keeps_paragraphs():
    paras = [f"paragraph {i}\nline two of {i}" for i in range(30)]
    text = "\n\n".join(paras)
    a, b = D.shuffle_paragraphs(text, 1), D.shuffle_paragraphs(text, 1)
    assert a == b and a != text
    assert sorted(a.split("\n\n")) == sorted(paras)
    assert D.shuffle_paragraphs(text, 2) != a


def test_lr_schedule():
    tc = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, tc) == pytest.approx(1e-4) and lr_at(9, tc) == pytest.approx(1e-3)
    assert lr_at(55, tc) == pytest.approx(0.55e-3)  # half way down the cosine
    assert lr_at(100, tc) == pytest.approx(1e-4)
    lrs = [lr_at(s, tc) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


# ---- baseline ------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny", "baby", "small"])
def test_baseline_matches_parameter_count(preset):
    cfg = ReSSFormerConfig.preset(preset)
    base = baseline_config(cfg, 2 * cfg.segment_len)
    n, nb = count_params(cfg), count_params(base)
    assert abs(nb - n) / n < 0.10
    assert not base.shared and base.top_k == 0 and base.normalizer == "softmax" and base.mem_slots == 0
    assert base.segment_len == base.max_positions == 2 * cfg.segment_len


def test_baseline_trains(tmp_path, corpus_file):
    res = train(TrainConfig(**FAST, data=corpus_file, steps=3, baseline=True, out=str(tmp_path)), **QUIET)
    assert res["config"]["top_k"] == 0 and math.isfinite(res["train"]["loss"])
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["config"]["normalizer"] == "softmax" and meta["train"]["config"]["baseline"] is True


# ---- MQAR ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("seq_len, pairs", [(64, 4), (128, 8), (256, 16)])
def test_mqar_answers_are_correct(seq_len, pairs):
    x, y = mqar_batch(50, seq_len=seq_len, n_pairs=pairs, vocab_size=256, seed=3)
    assert x.shape == y.shape == (50, seq_len) and x.min() >= 0 and x.max() < 256
    for row_x, row_y in zip(x, y):
        keys, values = row_x[0:2 * pairs:2], row_x[1:2 * pairs:2]
        assert len(set(keys)) == pairs and keys.max() < 128 <= values.min()
        kv = dict(zip(keys, values))
        q = np.flatnonzero(row_y != IGNORE)
        assert len(q) == pairs and q.min() >= 2 * pairs
        assert sorted(row_x[q]) == sorted(keys)  # every key is queried once ...
        assert all(row_y[t] == kv[row_x[t]] for t in q)  # ... and the label is its value


def test_mqar_is_deterministic_and_prefers_short_gaps():
    a, b = mqar_batch(20, seed=5), mqar_batch(20, seed=5)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(a[0], mqar_batch(20, seed=6)[0])
    _, y = mqar_batch(400, seq_len=256, n_pairs=4, seed=0)
    pos = np.nonzero(y != IGNORE)[1] - 8
    assert (pos < 124).mean() > 0.6  # power law: most queries land in the first half
    with pytest.raises(ValueError, match="too short"):
        mqar_batch(1, seq_len=16, n_pairs=8)


def test_mqar_command_runs(tmp_path):
    out = tmp_path / "mqar.json"
    r = CliRunner().invoke(main, ["mqar", "--steps", "3", "--batch-size", "4", "--eval-examples", "8",
                                  "--threads", "1", "--json-out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert 0.0 <= res["accuracy"] <= 1.0 and res["steps"] == 3 and res["n_pairs"] == 4


@pytest.mark.slow
def test_mqar_learns_recall():
    """3 minutes on one CPU core: the tiny model learns 4-pair recall at length 64 far above chance
    (1/128); measured 0.33 after 800 steps."""
    torch.set_num_threads(1)
    res = train_mqar(steps=800, batch_size=32, lr=3e-3, eval_examples=256, **QUIET)
    assert res["accuracy"] > 0.2


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_compiled_training_step_equals_eager(dtype):
    """torch.compile (CPU, inductor) of the model: one training step's loss and gradients equal eager's
    (issue 22; ~1 min to compile tiny on 2 cores). bf16: autocast with a bf16 initial state, as train.py."""
    import torch.nn.functional as F

    from ressformer import ReSSFormer, ReSSFormerConfig

    torch.manual_seed(0)
    m = ReSSFormer(ReSSFormerConfig.preset("tiny")).train()
    x, y = torch.randint(0, 256, (2, 64)), torch.randint(0, 256, (2, 64))

    def step(fwd):
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            state = m.init_state(2, dtype=torch.bfloat16) if dtype == "bf16" else None
            logits = fwd(x, state=state).logits
        loss = F.cross_entropy(logits.float().reshape(-1, 256), y.reshape(-1))
        loss.backward()
        return loss.item(), [p.grad.clone() for p in m.parameters() if p.grad is not None]

    le, ge = step(m)
    lc, gc = step(torch.compile(m))
    tol = 1e-5 if dtype == "fp32" else 3e-2
    assert abs(le - lc) <= tol * abs(le) and len(ge) == len(gc)
    for a, b in zip(ge, gc):
        torch.testing.assert_close(b, a, atol=tol * max(a.abs().max().item(), 1e-3) * 10, rtol=tol * 10)
